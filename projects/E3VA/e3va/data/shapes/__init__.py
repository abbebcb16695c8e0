"""A deterministic synthetic "shapes" instance-segmentation dataset, in COCO format, with semantic labels.

Each image is a textured background (smooth noise, stripes and checkers, mixed differently per image)
with a few filled, coloured geometric shapes that may overlap; later shapes occlude earlier ones and the
instance masks are the *visible* parts. Everything is drawn with numpy/cv2 from a seed, so the same
parameters always give byte-identical files.

The datasets are registered through Detectron2's own COCO machinery (``load_coco_json``, metadata with
``json_file`` / ``image_root`` / ``evaluator_type="coco"``), so training and evaluation run the real
COCO code path. Registration is cheap: the files are generated the first time they are needed.

Typical use in a LazyConfig::

    from e3va.data.shapes import SHAPES_CLASSES, build_shapes_evaluator
    dataloader.train.dataset = L(get_detection_dataset_dicts)(names="shapes_train")
    dataloader.evaluator = L(build_shapes_evaluator)(dataset_name="shapes_val")

Build the evaluator with :func:`build_shapes_evaluator` (not ``COCOEvaluator`` directly): the
evaluator reads the json file when it is constructed, which may be before anything has loaded the
dataset.

**Semantic segmentation.** The same images also come as a semantic segmentation dataset,
``shapes_sem_seg_train`` / ``shapes_sem_seg_val``, registered as Detectron2 registers ADE20K: its own
``load_sem_seg`` loader, metadata ``stuff_classes``, ``ignore_label=255``, ``evaluator_type="sem_seg"``
(``SemSegEvaluator``). Each image ``<split>/NNNNNN.png`` gets a label image ``<split>_sem_seg/NNNNNN.png``
(uint8, one channel): the class index 0..3 of the shape visible at the pixel (``SHAPES_CLASSES``, the
contiguous ids the COCO registration uses) and 4 (``"background"``) everywhere else. Background is a
class of its own, not ignored: telling shape from texture is half the task, and mIoU then scores it.
No pixel is 255; that value is left for padding and crops. The labels are made from the COCO json's
polygons (exact for the visible masks, see :func:`.render._mask_to_polygons`), so they agree with the instance
annotations by construction, and generated lazily too, after the COCO files, which they leave as they
were::

    dataloader.train.dataset = L(get_detection_dataset_dicts)(names="shapes_sem_seg_train")
    dataloader.evaluator = L(SemSegEvaluator)(
        dataset_name="shapes_sem_seg_val", sem_seg_loading_fn=load_sem_seg_label)  # e3va.data.sem_seg

``SemSegEvaluator`` loads its dataset in its constructor, which generates the files if needed (see
configs/Shapes/semseg_upernet_e3va.py).

The package is split by step: :mod:`.render` draws an image from a random generator, :mod:`.generate`
writes a split's files (once, under an inter-process lock, :func:`e3va.atomic.file_lock`), and
:mod:`.register` puts the splits into Detectron2's catalogs. Import from ``e3va.data.shapes`` itself:
LazyConfigs name ``e3va.data.shapes.build_shapes_evaluator``. The public names are the ``__all__`` below;
the three modules have none of their own.
"""
from .generate import (
    SHAPES_SEM_SEG_BACKGROUND,
    SHAPES_SEM_SEG_CLASSES,
    SHAPES_SEM_SEG_IGNORE,
    SHAPES_SPLITS,
    generate_shapes_dataset,
    generate_shapes_sem_seg,
    semantic_label,
)
from .register import (
    DEFAULT_SHAPES_NAMES,
    DEFAULT_SHAPES_SEM_SEG_NAMES,
    build_shapes_evaluator,
    default_shapes_root,
    ensure_shapes_dataset,
    ensure_shapes_sem_seg_dataset,
    register_shapes_datasets,
    register_shapes_sem_seg_datasets,
)
from .render import SHAPES_CLASSES, render_background, render_shapes_image

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_SEM_SEG_BACKGROUND",
    "SHAPES_SEM_SEG_CLASSES",
    "SHAPES_SEM_SEG_IGNORE",
    "SHAPES_SPLITS",
    "DEFAULT_SHAPES_NAMES",
    "DEFAULT_SHAPES_SEM_SEG_NAMES",
    "build_shapes_evaluator",
    "default_shapes_root",
    "ensure_shapes_dataset",
    "ensure_shapes_sem_seg_dataset",
    "generate_shapes_dataset",
    "generate_shapes_sem_seg",
    "register_shapes_datasets",
    "register_shapes_sem_seg_datasets",
    "render_background",
    "render_shapes_image",
    "semantic_label",
]
