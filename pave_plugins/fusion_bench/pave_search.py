"""PAVE's progressive full-rank search (PAVE Appendix A.1) for FusionBench ``pave/pave``: evaluate
each merge with a task pool, give full rank to the task furthest below its individual model, keep
the best of K candidates. A mixin of :class:`~pave_plugins.fusion_bench.pave.PAVEAlgorithm` (it
uses the algorithm's settings, inner method and profiler)."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Mapping

from omegaconf import DictConfig
from torch import nn

from pave_plugins.engine import purified_weight_from_tail

log = logging.getLogger("pave_plugins.fusion_bench.pave")


class PAVEConfigError(ValueError):
    """A PAVE parameter or covariance source does not fit the model pool (or the search its task pool)."""


def is_modulated(obj: Any) -> bool:
    try:
        from fusion_bench.models.modulator.base import ModulatedModel
    except Exception:  # pragma: no cover
        return False
    return isinstance(obj, ModulatedModel)



class ProgressiveSearch:
    """Appendix A.1 on top of the algorithm's purification and inner method."""

    def _taskpool(self):
        tp = self.taskpool
        if tp is None and self._program is not None:
            tp = getattr(self._program, "taskpool", None)
        if tp is None:
            raise PAVEConfigError(
                "PAVE: progressive_search needs a task pool to evaluate the merges (run with taskpool=... or "
                "pass method.taskpool)"
            )
        if isinstance(tp, (dict, DictConfig)):
            from fusion_bench import instantiate

            tp = instantiate(tp, _recursive_=tp.get("_recursive_", False))
            if hasattr(tp, "_program"):
                tp._program = self._program
            if hasattr(tp, "_fabric_instance") and self._fabric_instance is not None:
                tp._fabric_instance = self._fabric_instance
            self.taskpool = tp
        return tp

    def _score(self, report: Any, task: str) -> float:
        entry = report.get(task, report) if isinstance(report, Mapping) else report
        if isinstance(entry, (int, float)) and not isinstance(entry, bool):
            return float(entry)
        if isinstance(entry, Mapping):
            if self.search_metric in entry:
                return float(entry[self.search_metric])
            numbers = [v for v in entry.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(numbers) == 1:
                return float(numbers[0])
        raise PAVEConfigError(
            f"PAVE: cannot read metric {self.search_metric!r} of task {task!r} from the task pool report "
            f"{str(report)[:300]} (set method.search_metric)"
        )

    def evaluate_per_task(self, taskpool, model, names) -> tuple[dict[str, float], dict[str, Any]]:
        """Score of every task; a modulated model (EMR) is switched to each task before its evaluation."""
        scores, raw = {}, {}
        if is_modulated(model):
            for n in names:
                model.set_task(n)
                rep = taskpool.evaluate(model.backbone)
                raw[n] = rep.get(n, rep) if isinstance(rep, Mapping) else rep
                scores[n] = self._score(rep, n)
        else:
            rep = taskpool.evaluate(model)
            for n in names:
                raw[n] = rep.get(n, rep) if isinstance(rep, Mapping) else rep
                scores[n] = self._score(rep, n)
        return scores, raw

    def _progressive_search(self, modelpool, base, originals, working, tails, names, instance):
        """PAVE Appendix A.1: K candidates, each giving full rank to one more task (the one furthest
        below its individual model); the candidate with the best average score is returned."""
        taskpool = self._taskpool()
        sign = 1.0 if self.search_higher_is_better else -1.0

        def fresh(n: str) -> nn.Module:  # the unpurified fine-tuned model, never shared with an inner run
            return copy.deepcopy(originals[n]) if instance else modelpool.load_model(n)

        pristine = {k: v.detach().clone() for k, v in base.state_dict().items()}
        working.clear()  # purified weights are rebuilt per candidate from the stored tails
        if not instance:
            originals.clear()  # loaded (and purified in place) copies: fresh ones are loaded per candidate
        individual = {}
        with self.profile("evaluate"):
            for n in names:
                individual[n] = self.evaluate_per_task(taskpool, fresh(n), [n])[0][n]
        log.info("PAVE search: individual models %s", individual)
        full: list[str] = []
        candidates, best, best_avg = [], None, -math.inf
        for c in range(len(names)):
            cand_base = copy.deepcopy(base)
            cand_base.load_state_dict(pristine)
            models = {}
            for n in names:
                m = fresh(n)
                if n not in full:
                    sd = m.state_dict()
                    for key, (left, right) in tails[n].items():
                        sd[key].copy_(purified_weight_from_tail(sd[key].to(left.device), left, right, sd[key]))
                models[n] = m
            merged = self._run_inner(self._pool(cand_base, models))
            del models
            with self.profile("evaluate"):
                scores, raw = self.evaluate_per_task(taskpool, merged, names)
            avg = sum(scores.values()) / len(scores)
            candidates.append(
                {"candidate": c, "full_rank_tasks": list(full), "scores": scores, "average": avg, "report": raw}
            )
            log.info("PAVE search candidate %d (full rank: %s): average %.4f %s", c, full, avg, scores)
            if sign * avg > best_avg:
                best_avg, best = sign * avg, merged
            else:
                del merged
            if c == len(names) - 1:
                break
            gaps = {n: sign * (individual[n] - scores[n]) for n in names if n not in full}
            full.append(max(gaps, key=gaps.get))
        best_index = max(range(len(candidates)), key=lambda i: sign * candidates[i]["average"])
        for i, cand in enumerate(candidates):
            cand["selected"] = i == best_index
        log.info("PAVE search: kept candidate %d (average %.4f)", best_index, candidates[best_index]["average"])
        return best, {"individual": individual, "candidates": candidates, "selected": best_index}

