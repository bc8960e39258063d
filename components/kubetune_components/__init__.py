"""Code that runs inside a kubetune pipeline step or serving pod. Never imports the operator."""

__version__ = "0.1.0"
