"""The filesystem: the model of the tree and its pyfuse3 adapter."""
