"""`python -m minigpt ...` (what `torchrun -m minigpt train ...` runs)."""

from minigpt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
