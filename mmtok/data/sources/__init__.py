"""Built-in shard sources. Importing this package registers every builder in ``SHARD_BUILDERS``.

``fashion-mnist`` (real images + labels), ``fashion-scenes`` (referring segmentation),
``moving-fashion`` (mp4 clips), ``photos`` (scikit-image's and scikit-learn's bundled photographs, as
crops), ``folder`` (any folder of images with optional masks and metadata). See ``datasets/README.md``.
"""

from mmtok.data.sources import fashion_mnist, folder, moving, photos, scenes  # noqa: F401  (registration)
