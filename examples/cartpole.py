"""Run it: python examples/cartpole.py --help  (needs: pip install ".[examples]")

The code lives in pgest/examples/cartpole.py so that the pgest command and the tests
can run it from an installed package.
"""
from pgest.examples.cartpole import main

if __name__ == "__main__":
    main()
