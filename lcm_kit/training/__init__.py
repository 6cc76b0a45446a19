"""Training: the shared Accelerate loop, its flags, data, checkpoints, Hub upload, the objectives and the trainers.

* :mod:`.loop` / :mod:`.checkpoints`      ``run_training(args, accelerator, objective, dataloader)``, resume
* :mod:`.args`                            reusable argparse flag groups (diffusers' names)
* :mod:`.data`                            datasets / webdataset shards / encoded caches
* :mod:`.losses`                          each objective a small callable (LCM distillation, CD / CT / iCT, EDM)
* :mod:`.lcm_objective`, :mod:`.cm_objective`   the glue of each trainer (networks, loss, validation, outputs)
* :mod:`.fused_lora`                      the fused LoRA forward of the distillation step
* :mod:`.hub`                             model cards and upload
* :mod:`.train_lcm_lora`, :mod:`.train_lcm`, :mod:`.train_consistency`   entry points
  (``accelerate launch -m lcm_kit.training.train_lcm_lora ...``)

Submodules are imported on use so that importing this package stays cheap.
"""
