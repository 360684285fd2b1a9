"""Complexity routing: the learned router against the plan's keyword heuristic.

Both classify the same held-out prompts of `sage_ros/data/complexity_prompts.tsv` (the fixed
sha256 split; the router trains on the rest only). Reports accuracy, per-class precision and
recall, the confusion matrix (rows: true label, columns: predicted), the router's start-up cost
(embedding model load, then embedding the exemplars and fitting) and the per-prompt routing
latency. Each held-out prompt is routed once, alone, as the language block routes a turn, so
the embedder's cache never holds it.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Sequence

from common import report, summary_ms


def scores(truth: Sequence[str], predicted: Sequence[str],
           classes: Sequence[str]) -> Dict[str, object]:
    """Accuracy, per-class precision/recall/support and the confusion matrix."""
    confusion = {t: {p: 0 for p in classes} for t in classes}
    for t, p in zip(truth, predicted):
        confusion[t][p] += 1
    per_class: Dict[str, Dict[str, float]] = {}
    for c in classes:
        hits = confusion[c][c]
        predicted_c = sum(confusion[t][c] for t in classes)
        support = sum(confusion[c].values())
        per_class[c] = {'precision': round(hits / predicted_c, 4) if predicted_c else 0.0,
                        'recall': round(hits / support, 4) if support else 0.0,
                        'support': support}
    correct = sum(confusion[c][c] for c in classes)
    return {'accuracy': round(correct / max(1, len(truth)), 4), 'per_class': per_class,
            'confusion': confusion}


def timed(classify: Callable[[str], object], texts: Sequence[str]) -> List[float]:
    durations = []
    for text in texts:
        start = time.perf_counter()
        classify(text)
        durations.append(time.perf_counter() - start)
    return durations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args()

    from sage_ros.core.embeddings import shared_embedder
    from sage_ros.core.routing import (CLASSES, ComplexityRouter, estimate_complexity,
                                       load_prompts, split_prompts)

    prompts = load_prompts()
    training, held_out = split_prompts(prompts)
    classes = [c.value for c in CLASSES]
    embedder = shared_embedder()

    start = time.perf_counter()
    embedder.embed(['warm-up'])
    model_load_s = time.perf_counter() - start
    start = time.perf_counter()
    router = ComplexityRouter(training, embedder.embed)
    build_s = time.perf_counter() - start

    texts = [p.text for p in held_out]
    truth = [p.label.value for p in held_out]
    router_latency = timed(router.classify, texts)          # first sight of each prompt
    heuristic_latency = timed(estimate_complexity, texts)
    router_pred = [c.value for c in router.classify_many(texts)]
    heuristic_pred = [estimate_complexity(t).value for t in texts]
    report('router_accuracy', {
        'dataset': {'prompts': len(prompts), 'training': len(training),
                    'held_out': len(held_out),
                    'held_out_per_class': {c: truth.count(c) for c in classes}},
        'router': {**scores(truth, router_pred, classes),
                   'latency_per_prompt': summary_ms(router_latency)},
        'keyword_heuristic': {**scores(truth, heuristic_pred, classes),
                              'latency_per_prompt': summary_ms(heuristic_latency)},
        'router_startup_s': {'embedding_model_load': round(model_load_s, 3),
                             'embed_exemplars_and_fit': round(build_s, 3)},
        'router_settings': {'neighbours': router.neighbours,
                            'vote_temperature': router.vote_temperature, 'l2': router.l2},
        'misrouted_by_router': [{'prompt': t, 'label': y, 'router': p}
                                for t, y, p in zip(texts, truth, router_pred) if y != p],
    })


if __name__ == '__main__':
    main()
