"""Run it: python examples/guess_the_label.py --help  (needs: pip install ".[examples]")

The code lives in pgest/examples/guess_the_label.py so that the pgest command and the tests
can run it from an installed package.
"""
from pgest.examples.guess_the_label import main

if __name__ == "__main__":
    main()
