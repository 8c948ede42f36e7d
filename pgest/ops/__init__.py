"""One module per kernel stem of csrc/include/pgest/<stem>.h: argument
structs, launches, torch.library registration (fake, autograd, vmap) and the
eager fast path. The public functions live one level up."""
