"""Small helpers every room of the control plane may use; they import nothing else of kubetune."""
