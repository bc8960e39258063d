"""The contract between kubetune's control plane and the code that runs in steps and serving pods.

Every spec field, default and rule (the pydantic models of each kind), every condition type, and every
workspace file name and environment variable is defined here once. Both ``kubetune`` (the operator and
CLI) and ``kubetune_components`` (pipeline steps, model servers) import it; it imports neither.
"""
