"""Run it: python examples/grpo_lm.py --help  (needs: pip install ".[hf]")

The code lives in pgest/examples/grpo_lm.py so that the tests can run it from an installed package.
"""
from pgest.examples.grpo_lm import main

if __name__ == "__main__":
    main()
