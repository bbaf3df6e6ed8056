"""Writes LABELS/vocab.json for trainer tests with the distillation stage's own writer (one format)."""
from pipeline.distill.concepts import VocabConfig, Vocabulary, write_vocab_json


def write_vocab(labels_dir, objects: list[str], attributes: list[str]) -> None:
    vocabs = {"objects": Vocabulary("objects", tuple(objects), tuple([1] * len(objects))),
              "attributes": Vocabulary("attributes", tuple(attributes), tuple([1] * len(attributes)))}
    write_vocab_json(vocabs, str(labels_dir / "vocab.json"), VocabConfig())
