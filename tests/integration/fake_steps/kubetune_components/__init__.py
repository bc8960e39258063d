"""A stand-in for the real step code, used only to test the local backend's process handling.

It shadows the real package through PYTHONPATH in those tests: steps that take seconds instead of
minutes, and whose failures and timing the test controls through environment variables.
"""

__version__ = "0.0.0-fake"
