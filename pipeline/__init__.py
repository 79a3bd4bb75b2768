"""Pure analysis code: series selection, volume loading, segmentation, classifiers, VBQ, results.

Nothing here does networking, queueing or touches the node's spool.
"""
