#!/usr/bin/env python
"""Trains and evaluates E3VA detectors from Detectron2 LazyConfig files (logic in ``e3va.engine.training``).

Usage::

    python tools/lazyconfig_train_net.py --config-file configs/Shapes/mask_rcnn_e3va.py
    python tools/lazyconfig_train_net.py --config-file configs/COCO/mask_rcnn_swin_t_e3va.py \\
        --num-gpus 8 model.backbone.bottom_up.tuning=e3va_plus
    python tools/lazyconfig_train_net.py --config-file CONFIG --eval-only train.init_checkpoint=MODEL.pth
    python tools/lazyconfig_train_net.py --config-file CONFIG --resume   # continue in train.output_dir

Several processes and machines go through Detectron2's ``launch``: ``--num-gpus N`` starts N processes on
this machine, one per GPU over NCCL where CUDA is available, N CPU processes over gloo where it is not;
``--num-machines M --machine-rank R --dist-url tcp://HOST:PORT`` joins M machines (docs/DISTRIBUTED.md).
``dataloader.train.total_batch_size`` is the batch over all processes (Detectron2 divides it among them).
"""
import argparse

from detectron2.engine import default_argument_parser, launch

from e3va.engine.training import main

NUM_GPUS_HELP = (
    "processes per machine: one per GPU (NCCL) where CUDA is available; on a machine without CUDA, "
    "this many CPU processes over gloo (each takes an equal share of the cores unless OMP_NUM_THREADS is set)"
)


def argument_parser() -> argparse.ArgumentParser:
    """Detectron2's parser, with ``--num-gpus`` saying what it means on a CPU machine."""
    parser = default_argument_parser()
    parser._option_string_actions["--num-gpus"].help = NUM_GPUS_HELP  # argparse has no public setter
    return parser


def invoke_main() -> None:
    args = argument_parser().parse_args()
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
