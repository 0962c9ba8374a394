"""Code shared by the recipes: books as token windows (`text_data`), QuALITY/RACE readers (`quality`), the offline
SmolLM2 (`smollm2`), a tiny random Llama (`tiny_llama`), what every run records (`runs`), and the causal-LM recipe's
parts (`lm_distillation`, `lm_evaluation`).

Kept out of `had_hf`: the method package does not import task data code.
"""
