"""The command line (``python -m aiograceful demo | probe``) and the harnesses behind it.

Not a floor of the library: nothing in ``aiograceful`` imports from here.
"""
