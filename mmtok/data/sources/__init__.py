"""Built-in shard sources. Importing this package registers every builder in ``SHARD_BUILDERS``.

``fashion-mnist`` (real images + labels), ``fashion-scenes`` (referring segmentation),
``moving-fashion`` (mp4 clips), ``photos`` (scikit-image's bundled photographs with crops), ``folder``
(any folder of images with optional masks and metadata). See ``datasets/README.md``.
"""

from mmtok.data.sources import fashion_mnist, scenes  # noqa: F401  (registration side effect)

for _name in ("moving", "photos", "folder"):  # added as they are written; each registers its builder
    try:
        __import__(f"mmtok.data.sources.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"mmtok.data.sources.{_name}":
            raise
