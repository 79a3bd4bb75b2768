"""Pure analysis code: series selection, volume loading, segmentation, classifiers, VBQ, results.

Nothing here does networking, queueing or touches the node's spool. One study flows through:

* :mod:`pipeline.selection` - pick the sagittal T1 and T2 series from headers;
* :mod:`pipeline.volume` - decode and stack a series on its source grid;
* :mod:`pipeline.segment` - MONAI UNet, vertebral bodies T12..S1 + CSF, post-processing;
* :mod:`pipeline.preprocess` - the one crop definition shared with ``train/``;
* :mod:`pipeline.classify` - timm classifiers per sequence, patient aggregation;
* :mod:`pipeline.vbq` - the training-free VBQ score;
* :mod:`pipeline.registry` - model folders, manifests, verified weights;
* :mod:`pipeline.result` - the frozen result and its JSON form;
* :mod:`pipeline.analyze` - :class:`~pipeline.analyze.Analyzer`, which runs all of the above;
* :mod:`pipeline.dicom_out` - the DICOM objects (SEG, SR, key image) of a result.
"""
