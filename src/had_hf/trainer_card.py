"""The run record, model card and Hub push of a `HADDistillationTrainer` (mixed into it): any trainer run can write
and push a full HAD card, without a recipe."""

from __future__ import annotations

import json
import os


class TrainerCardMixin:
    """`evaluate_teacher`, `run_record`, `save_run_record`, and the HAD versions of `create_model_card` and
    `push_to_hub` (see `had_hf.hub`)."""

    def evaluate_teacher(self, eval_dataset=None) -> dict[str, float]:
        """The teacher's metrics on the eval set with the trainer's `compute_metrics` (not logged), kept in
        `teacher_metrics` for the run record and the model card."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, dict):  # several eval sets: the first one, as the card has one results table
            dataset = next(iter(dataset.values()))
        self._predict_with_teacher = True
        try:
            metrics = self.predict(dataset, metric_key_prefix="eval").metrics
        finally:
            self._predict_with_teacher = False
        from .hub import model_metrics

        self.teacher_metrics = model_metrics(metrics)
        return self.teacher_metrics

    def _evaluate_teacher_once(self) -> None:
        """The teacher's metrics for the run record, on every process: evaluation gathers across processes, so it
        cannot wait for the main process's card."""
        if self.teacher_metrics is None and self.eval_dataset is not None and self.compute_metrics is not None:
            self.evaluate_teacher()

    def run_record(self, **kwargs) -> dict:
        """The record of this run for its model card (see `had_hf.hub.run_record`)."""
        from .hub import run_record

        return run_record(self, **kwargs)

    def save_run_record(self, **kwargs) -> str | None:
        """Writes the run record to `output_dir/results.json`, unless a recipe wrote its own record there (the
        trainer replaces only a record it wrote itself). Returns the path written, or `None`."""
        from .hub import RESULTS_FILENAME
        from .hub.record import RECORDED_BY

        path = os.path.join(self.args.output_dir, RESULTS_FILENAME)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                if json.load(file).get("recorded_by") != RECORDED_BY:
                    return None
        record = self.run_record(**kwargs)
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=2, default=str)
        return path

    def create_model_card(self, model_name: str | None = None, **kwargs) -> None:
        """Writes the HAD model card (results table, HADConfig, stage schedule, training curves) into `output_dir`,
        from its `results.json` (a recipe's, or the trainer's run record, written here when there is none). Call it
        after `save_model`: the card describes the saved `config.json`."""
        self._evaluate_teacher_once()
        if not self.is_world_process_zero():
            return
        from .hub import write_card_files

        self.save_run_record()
        write_card_files(self.args.output_dir, self.args.output_dir, repo_id=self.args.hub_model_id)

    def push_to_hub(self, commit_message: str | None = "End of training", **kwargs) -> str | None:
        """Saves the student and its run record, and pushes `output_dir` in one commit with the HAD card (see
        `had_hf.hub.push_to_hub`). Returns the commit URL (`None` on other processes than the main one)."""
        from .hub import push_to_hub

        self.save_model(_internal_call=True)  # not `save_model()`: with args.push_to_hub it would push again
        self._evaluate_teacher_once()
        if not self.is_world_process_zero():
            return None
        self.save_run_record()
        repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        return push_to_hub(
            self.args.output_dir,
            repo_id,
            token=self.args.hub_token,
            private=bool(self.args.hub_private_repo),
            commit_message=commit_message,
            revision=kwargs.get("revision"),
            license=kwargs.get("license"),
        )
