"""Run it: torchrun --nproc-per-node 2 examples/vocab_parallel.py --compare

The code lives in pgest/examples/vocab_parallel.py so that the tests can run it
from an installed package.
"""
from pgest.examples.vocab_parallel import main

if __name__ == "__main__":
    main()
