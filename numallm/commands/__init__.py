"""The command-line verbs, one module each (register(subparsers) adds its parser); the only
layer that prints or exits."""
