"""Dataset jobs on Ray Data (`recon-run dataset encode|reconstruct|evaluate`).

ray and pyarrow (the `ray` extra) are imported only inside functions: importing this package never
imports them.
"""
