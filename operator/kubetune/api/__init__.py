"""The kubetune API machinery: the kinds the operator serves, their CRDs and document validation.

The models themselves (spec and status of every kind) live in :mod:`kubetune_contract`, which the
pipeline steps and serving pods import too.
"""
