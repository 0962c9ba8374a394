"""Code shared by the recipes: GLUE readers, extra inputs, augmentations (`glue`) and metrics (`glue_metrics`);
books as token windows (`text_data`), QuALITY/RACE readers (`quality`), the offline SmolLM2 (`smollm2`), a tiny random
Llama (`tiny_llama`); the flags, paths, student and run record every recipe shares (`arguments`, `run_paths`,
`student`, `distillation`, `run_record`, `runs`); the causal-LM recipe's parts (`lm_distillation`, `lm_evaluation`).

Kept out of `had_hf`: the method package does not import task data code.
"""
