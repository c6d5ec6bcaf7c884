"""WSM pre-training on Megatron-Core (``wsm-train``).

- :mod:`.config`: typed sections, YAML files, dot-notation overrides, validation;
- :mod:`.model`: the GPTModel (local or Transformer Engine spec; dense or MoE);
- :mod:`.optimizer`: Megatron DDP and optimizer (distributed + bf16 on GPU, FP32 on CPU);
- :mod:`.schedules`: ``wsm`` (warmup + constant) and the ``wsd``/``cosine``/``linear`` baselines;
- :mod:`.checkpointing` and :mod:`.retention`: Megatron-LM ``torch_dist`` checkpoints, resume,
  pruning to the merge window;
- :mod:`.steps`, :mod:`.evaluate`, :mod:`.trainer`: the loop and validation;
- :mod:`.callbacks`: the loop's parts (metrics, evaluation, the online merge) on lifecycle hooks;
- :mod:`.online_merge`: the merged model at every save, from :mod:`wsm_megatron.snapshots`;
- :mod:`.metrics`, :mod:`.loggers`: FLOPs, memory, console, JSON lines, wandb, TensorBoard.
"""
