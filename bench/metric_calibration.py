"""How real *training* images score on the project's metric, as if a generator had produced them: what a generator
that reproduced its training images would score. Prints JSON. Used for the issue-3 analysis in development_log.md.

    python bench/metric_calibration.py data=digits [n=1000] [draws=20] [root=prepared] [split=prepared]

Each draw scores n random training images (with their labels) with the data set's Evaluator. split=prepared uses
the prepared copy and its cached classifier (what every run is scored with); for digits, split=file_order (the
pre-twenty-sixth-session cut: the last 20% of each class in file order), first (the first 20%) or random (today's
rule, rebuilt here) cut sklearn's file in-process and train a fresh classifier (default epochs) on that train split.
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.evaluate import Evaluator, default_epochs, evaluator_for, train_classifier  # noqa: E402


def digits_cut(rule: str):
    """(x_train, y_train, x_test, y_test) of sklearn digits cut by data.builtin.digits_test_mask's `rule`."""
    from data.builtin import digits_in_file_order, digits_test_mask

    x, y = digits_in_file_order()
    test = digits_test_mask(y, rule)
    return x[~test], y[~test], x[test], y[test]


def main(argv):
    kv = dict(a.split("=", 1) for a in argv)
    name, n, draws = kv.get("data", "digits"), int(kv.get("n", 1000)), int(kv.get("draws", 20))
    split = kv.get("split", "prepared")
    if split == "prepared":
        from data.loader import load_split
        from data.meta import load_meta
        from data.prepare import ensure_prepared

        meta, d = ensure_prepared(name, kv.get("root", "prepared"))
        ev = evaluator_for(load_meta(d), d, kv.get("root", "prepared"))
        x, y = load_split(meta, d, "train")
    else:
        if name != "digits":
            raise SystemExit("split=file_order|first|random re-cuts sklearn digits only")
        x, y, xt, yt = digits_cut(split)
        clf, _ = train_classifier(x, y, xt, yt, num_classes=10, epochs=default_epochs(len(y)))
        ev = Evaluator(clf, 10, xt, yt)
    ratios = []
    for s in range(draws):
        idx = np.random.RandomState(s).permutation(len(y))[:n]
        r = ev.evaluate(x[idx], y[idx])
        ratios.append(r["fd_ratio"])
    ratios = np.array(ratios)
    print(json.dumps({"data": name, "split": split, "n": n, "n_fd": r["n_fd"], "draws": draws,
                      "classifier_test_acc": round(ev.real_acc, 4),
                      "train_images_fd_ratio": {"mean": round(float(ratios.mean()), 3),
                                                "median": round(float(np.median(ratios)), 3),
                                                "min": round(float(ratios.min()), 3),
                                                "max": round(float(ratios.max()), 3),
                                                "share_at_most_2": round(float(np.mean(ratios <= 2)), 2)},
                      "ratios": [round(float(v), 2) for v in ratios]}))


if __name__ == "__main__":
    main(sys.argv[1:])
