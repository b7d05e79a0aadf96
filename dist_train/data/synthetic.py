"""Small synthetic image sets for the tasks beyond single-label classification (offline, seeded, seconds to write).

    python -m dist_train.data.synthetic attributes data/attributes   # mask x gender x age, 18 combined classes
    python -m dist_train.data.synthetic regression data/brightness   # a number per image
    python -m dist_train.data.synthetic ranking data/ranking         # queries of images with a relevance each
    python -m dist_train.data.synthetic multilabel data/multilabel   # 1-4 digits per image, the set of them the labels
    python -m dist_train.data.synthetic masks data/masks             # a mask / gender / age competition's layout
    python -m dist_train.data.synthetic score data/masks runs/masks/submission.csv   # its submission against the answers

Each but `masks` writes PNGs under <root>/images, train.csv, val.csv, info.csv (test: id + image) and test_labels.csv.
`masks` writes the layout of the mask / gender / age band competition (see write_masks).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

MASK = ["wear", "incorrect", "not_wear"]
GENDER = ["male", "female"]
AGE = ["young", "middle", "old"]
MARKER = ".complete"


def attribute_image(mask: int, gender: int, age: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """Background colour = gender, a white block's height = mask, a green stripe's length = age; plus noise."""
    image = np.zeros((size, size, 3), dtype=np.float32)
    image[:] = (60, 60, 160) if gender == 0 else (160, 60, 60)
    height = {0: 6, 1: 3, 2: 0}[mask]
    if height:
        image[size - 2 - height:size - 2, size // 4: 3 * size // 4] = 235
    image[1:3, 1:1 + 4 * (age + 1)] = (40, 220, 40)
    image += rng.normal(0, 70, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def _write(root: Path, rows: dict[str, list[dict]], draw, seed: int) -> Path:
    """rows: split -> dicts with `id` and labels; draw(row, rng) -> HxWx3 uint8. Written atomically."""
    if (root / MARKER).is_file():
        return root
    rng = np.random.default_rng(seed)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    for split, items in rows.items():
        for row in items:
            Image.fromarray(draw(row, rng)).save(tmp / "images" / f"{row['id']}.png")
            row["image"] = f"images/{row['id']}.png"
        columns = ["id", "image"] if split == "info" else ["id", "image", *[k for k in items[0] if k not in ("id", "image")]]
        with open(tmp / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(items)
        if split == "info":
            with open(tmp / "test_labels.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=[k for k in items[0] if k != "image"])
                writer.writeheader()
                writer.writerows({k: v for k, v in r.items() if k != "image"} for r in items)
    (tmp / MARKER).write_text("dist_train.synthetic\n")
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, root)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _splits(count: int, make, rng: np.random.Generator) -> dict[str, list[dict]]:
    """70/15/15 of `count` rows made by make(i, rng)."""
    rows = [make(i, rng) for i in range(count)]
    a, b = int(0.7 * count), int(0.85 * count)
    return {"train": rows[:a], "val": rows[a:b], "info": rows[b:]}


def write_attributes(root: str | Path, count: int = 1800, seed: int = 0) -> Path:
    """Images with three attributes: mask (3), gender (2), age band (3): 18 combined classes."""
    rng = np.random.default_rng(seed)

    def make(i, rng):
        return {"id": f"p{i:05d}", "mask": MASK[rng.integers(3)], "gender": GENDER[rng.integers(2)], "age": AGE[rng.integers(3)]}

    def draw(row, rng):
        return attribute_image(MASK.index(row["mask"]), GENDER.index(row["gender"]), AGE.index(row["age"]), rng)

    return _write(Path(root), _splits(count, make, rng), draw, seed + 1)


def write_multilabel(root: str | Path, count: int = 2400, seed: int = 0) -> Path:
    """Multi-label images: a 2 x 2 grid of 8 x 8 cells (16 x 16 pixels) holding 1-4 different digits of scikit-learn's
    handwritten digits (offline), the set of them the labels -- `labels`, space-separated ("1 3 7"), the Kaggle layout.
    The digits are not equally common (0 in about 2 of 3 images, 9 in about 1 in 8), as a product's tags are not."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pools = [np.flatnonzero(digits.target == d) for d in range(10)]
    weights = 1.0 / np.arange(1, 11)
    weights /= weights.sum()
    rng = np.random.default_rng(seed)

    def make(i, rng):
        present = rng.choice(10, size=int(rng.integers(1, 5)), replace=False, p=weights)
        return {"id": f"m{i:05d}", "labels": " ".join(str(d) for d in sorted(present))}

    def draw(row, rng):
        image = np.zeros((16, 16), dtype=np.float32)
        labels = [int(d) for d in row["labels"].split()]
        for digit, cell in zip(labels, rng.permutation(4)):
            tile = digits.images[rng.choice(pools[digit])] * 15.0
            top, left = 8 * (cell // 2), 8 * (cell % 2)
            image[top:top + 8, left:left + 8] = tile
        image = image + rng.normal(0, 20, image.shape)
        return np.repeat(image.clip(0, 255).astype(np.uint8)[:, :, None], 3, axis=2)

    return _write(Path(root), _splits(count, make, rng), draw, seed + 1)


def write_regression(root: str | Path, count: int = 600, seed: int = 0) -> Path:
    """Grey images whose brightness is the target (`value`, 0-10) and the size of a bright square a second (`size`)."""
    rng = np.random.default_rng(seed)

    def make(i, rng):
        return {"id": f"r{i:05d}", "value": f"{rng.uniform(0, 10):.3f}", "size": str(int(rng.integers(2, 9)))}

    def draw(row, rng):
        image = np.full((16, 16, 3), 20 + 20 * float(row["value"]), dtype=np.float32)
        s = int(row["size"])
        image[8 - s // 2: 8 - s // 2 + s, 8 - s // 2: 8 - s // 2 + s] = 250
        return (image + rng.normal(0, 4, image.shape)).clip(0, 255).astype(np.uint8)

    return _write(Path(root), _splits(count, make, rng), draw, seed + 1)


def write_ranking(root: str | Path, queries: int = 60, per_query: int = 8, seed: int = 0) -> Path:
    """Queries of `per_query` images each; relevance 0-3 shows as the brightness of a centre block."""
    rng = np.random.default_rng(seed)
    rows = {"train": [], "val": [], "info": []}
    for q in range(queries):
        split = "train" if q < 0.7 * queries else "val" if q < 0.85 * queries else "info"
        for j in range(per_query):
            rows[split].append({"id": f"q{q:03d}_{j}", "query": f"q{q:03d}", "relevance": str(int(rng.integers(4)))})

    def draw(row, rng):
        image = np.full((16, 16, 3), 40, dtype=np.float32)
        image[4:12, 4:12] = 60 + 60 * int(row["relevance"])
        return (image + rng.normal(0, 25, image.shape)).clip(0, 255).astype(np.uint8)

    return _write(Path(root), rows, draw, seed + 1)


PHOTOS = ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]
"""Each person's photos: five with the mask worn (mask 0), one worn incorrectly (1), one without (2)."""
AGE_BANDS = [(18, 29), (30, 59), (60, 75)]


def write_masks(root: str | Path, people: int = 360, eval_people: int = 300, size: int = 32, seed: int = 0) -> Path:
    """The layout of the mask / gender / age band competition, with small synthetic photos (JPEG):

        train/images/<person>/{mask1..mask5,incorrect_mask,normal}.jpg   7 photos per person, e.g. 000007_female_Asian_45
        train/labels.csv    path,label,mask,gender,age_band   (path relative to train/; label = 6 mask + 3 gender + age_band;
                            mask 0 worn, 1 incorrect, 2 none; gender 0 male, 1 female; age_band 0 <30, 1 30-59, 2 >=60)
        eval/images/<ImageID>   the test photos of `eval_people` other people, flat, under hashed names
        eval/info.csv       ImageID,ans   (ans 0: the submission fills it, same rows, same order)
        eval/answers.csv    ImageID,ans   the held-out answers, to score a submission

    A person's gender and age show in their photos only as noisy cues (drawn once per person), and every person has
    a face of their own: a model can learn the labels of the people it saw by heart, which a validation split that
    puts one person's photos on both sides rewards and a test on new people does not.
    """
    root = Path(root)
    if (root / MARKER).is_file():
        return root
    rng = np.random.default_rng(seed)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    persons = [_person(i + 1, rng) for i in range(people + eval_people)]
    rows, answers = [], []
    for person in persons[:people]:
        folder = tmp / "train" / "images" / person["folder"]
        folder.mkdir(parents=True)
        for photo, mask, image in _photos(person, size, rng):
            image.save(folder / f"{photo}.jpg", quality=90)
            rows.append([f"images/{person['folder']}/{photo}.jpg", 6 * mask + 3 * person["gender"] + person["age_band"],
                         mask, person["gender"], person["age_band"]])
    (tmp / "eval" / "images").mkdir(parents=True)
    for person in persons[people:]:
        for photo, mask, image in _photos(person, size, rng):
            name = hashlib.sha1(f"{seed}/{person['folder']}/{photo}".encode()).hexdigest() + ".jpg"
            image.save(tmp / "eval" / "images" / name, quality=90)
            answers.append([name, 6 * mask + 3 * person["gender"] + person["age_band"]])
    answers = [answers[i] for i in rng.permutation(len(answers))]
    _csv(tmp / "train" / "labels.csv", ["path", "label", "mask", "gender", "age_band"], rows)
    _csv(tmp / "eval" / "info.csv", ["ImageID", "ans"], [[name, 0] for name, _ in answers])
    _csv(tmp / "eval" / "answers.csv", ["ImageID", "ans"], answers)
    (tmp / MARKER).write_text("dist_train.synthetic masks\n")
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, root)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _person(number: int, rng: np.random.Generator) -> dict:
    gender, age_band = int(rng.integers(2)), int(rng.choice(3, p=[0.45, 0.4, 0.15]))
    age = int(rng.integers(AGE_BANDS[age_band][0], AGE_BANDS[age_band][1] + 1))
    return {"folder": f"{number:06d}_{['male', 'female'][gender]}_Asian_{age}", "gender": gender, "age_band": age_band,
            "skin": rng.uniform(90, 200, 3), "face": rng.normal(0, 45, (4, 4, 3)),
            # the cues: the same for all of a person's photos, noisy across people
            "hair": 60 + 90 * gender + rng.normal(0, 35), "lines": 70 * age_band + rng.normal(0, 30)}


def _photos(person: dict, size: int, rng: np.random.Generator):
    """(photo name, mask, image) of each of a person's PHOTOS."""
    for variant, photo in enumerate(PHOTOS):
        mask = 0 if photo.startswith("mask") else 1 if photo == "incorrect_mask" else 2
        yield photo, mask, Image.fromarray(_mask_photo(person, mask, variant, size, rng))


def _mask_photo(person: dict, mask: int, variant: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A face of the person's own colours and pattern, hair whose shade is the gender cue, lines across the forehead
    whose contrast is the age cue, and the mask: over mouth and nose (worn), under the nose (incorrect) or none."""
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = person["skin"]
    face = np.kron(person["face"], np.ones((size // 8, size // 8, 1)))
    image[size // 4: size // 4 + face.shape[0], size // 4: size // 4 + face.shape[1]] += face
    image[: size // 6] = person["hair"]
    for row in range(size // 5, size // 5 + 3, 2):
        image[row, size // 4: 3 * size // 4] -= person["lines"]
    dy, dx = rng.integers(-1, 2, 2)
    if mask < 2:
        top = (size // 2 if mask == 0 else 2 * size // 3) + dy
        colour = [(230, 230, 235), (120, 170, 230), (40, 40, 45), (200, 120, 160), (150, 200, 150), (225, 225, 230)][variant % 6]
        image[top: top + size // 3 - (mask * size // 8), size // 5 + dx: 4 * size // 5 + dx] = colour
    image += rng.normal(0, 12, image.shape)
    return np.roll(image, (dy, dx), axis=(0, 1)).clip(0, 255).astype(np.uint8)


def score_masks(root: str | Path, submission: str | Path) -> dict:
    """A submission of write_masks' eval/info.csv against eval/answers.csv: its accuracy and macro-F1 over the 18
    classes (scikit-learn), after checking it has info.csv's rows in info.csv's order."""
    from sklearn.metrics import accuracy_score, f1_score

    with open(Path(root) / "eval" / "answers.csv", newline="") as f:
        answers = {row["ImageID"]: row["ans"] for row in csv.DictReader(f)}
    with open(Path(root) / "eval" / "info.csv", newline="") as f:
        order = [row["ImageID"] for row in csv.DictReader(f)]
    with open(submission, newline="") as f:
        rows = list(csv.DictReader(f))
    if [row.get("ImageID") for row in rows] != order:
        raise SystemExit(f"error: {submission} does not list eval/info.csv's ImageIDs in its order")
    truth, predicted = [answers[i] for i in order], [row["ans"] for row in rows]
    return {"rows": len(rows), "accuracy": float(accuracy_score(truth, predicted)),
            "f1_macro": float(f1_score(truth, predicted, labels=[str(c) for c in range(18)], average="macro", zero_division=0))}


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["attributes", "multilabel", "regression", "ranking", "masks", "score"])
    parser.add_argument("root")
    parser.add_argument("submission", nargs="?", help="score: the submission CSV to score against <root>/eval/answers.csv")
    parser.add_argument("--people", type=int, default=360, help="masks: training people (7 photos each)")
    parser.add_argument("--eval-people", type=int, default=300, help="masks: test people (7 photos each)")
    parser.add_argument("--image-size", type=int, default=32, help="masks: photo width and height")
    args = parser.parse_args()
    if args.kind == "masks":
        print(f"wrote {write_masks(args.root, args.people, args.eval_people, args.image_size)}")
        return
    if args.kind == "score":
        if args.submission is None:
            parser.error("score needs the submission: python -m dist_train.data.synthetic score data/masks runs/masks/submission.csv")
        scores = score_masks(args.root, args.submission)
        print(f"{args.submission}: {scores['rows']} rows, accuracy {scores['accuracy']:.4f}, macro-F1 {scores['f1_macro']:.4f}")
        return
    writer = {"attributes": write_attributes, "multilabel": write_multilabel, "regression": write_regression,
              "ranking": write_ranking}[args.kind]
    print(f"wrote {writer(args.root)}")


if __name__ == "__main__":
    main()
