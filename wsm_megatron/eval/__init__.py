"""Downstream scores through lm-evaluation-harness (the optional ``[eval]`` extra):
:class:`~wsm_megatron.eval.adapter.MegatronLM` and :func:`~wsm_megatron.eval.harness.run_tasks`,
behind ``wsm-eval`` and ``wsm-tune --tasks lm-eval:TASK``."""
