"""minigpt: a from-scratch GPT-2 toolkit, from raw text to a model you can chat with.

Importing the package is cheap on purpose: submodules (and torch) load only when used.
"""

__version__ = "0.1.0"
