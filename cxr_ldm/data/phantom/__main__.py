"""`python -m cxr_ldm.data.phantom`: see `cli`."""
from cxr_ldm.data.phantom.cli import main

main()
