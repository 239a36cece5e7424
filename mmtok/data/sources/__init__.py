"""Built-in shard sources. Importing this package registers every builder in ``SHARD_BUILDERS``.

``fashion-mnist`` (real images + labels), ``fashion-scenes`` (referring segmentation),
``moving-fashion`` (mp4 clips), ``photos`` (scikit-image's and scikit-learn's bundled photographs, as
crops), ``folder`` (any folder of images with optional masks and metadata), ``refcoco`` (RefCOCO / RefCOCO+ /
RefCOCOg in the refer toolkit's layout, from files the user downloaded). See ``datasets/README.md``.
"""

from mmtok.data.sources import fashion_mnist, folder, moving, photos, refcoco, scenes  # noqa: F401  (registration)
