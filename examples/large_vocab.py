"""Run it: python examples/large_vocab.py --help  (needs: pip install ".[examples]")

The code lives in pgest/examples/large_vocab.py so that the pgest command and the tests
can run it from an installed package.
"""
from pgest.examples.large_vocab import main

if __name__ == "__main__":
    main()
