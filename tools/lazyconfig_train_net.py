#!/usr/bin/env python
"""Trains and evaluates E3VA detectors from Detectron2 LazyConfig files (logic in ``e3va.engine.training``).

Usage::

    python tools/lazyconfig_train_net.py --config-file configs/Shapes/mask_rcnn_e3va.py
    python tools/lazyconfig_train_net.py --config-file configs/COCO/mask_rcnn_swin_t_e3va.py \\
        --num-gpus 8 model.backbone.bottom_up.tuning=e3va_plus
    python tools/lazyconfig_train_net.py --config-file CONFIG --eval-only train.init_checkpoint=MODEL.pth
    python tools/lazyconfig_train_net.py --config-file CONFIG --resume   # continue in train.output_dir
"""
from detectron2.engine import default_argument_parser, launch

from e3va.engine.training import main


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
