"""Model-derived names of findings (core/evidence/names.py)."""
import numpy as np
import pytest

from ravl_pipeline.core.evidence import names
from ravl_pipeline.core.findings import Feature


def test_packaged_vocabulary_has_colours_shapes_objects_and_combinations():
    terms = names.load_vocabulary()
    for term in ("red", "square", "circle", "dog", "red square", "blue circle", "green triangle"):
        assert term in terms
    assert len(terms) == len(set(terms))
    assert not any(t.startswith("#") for t in terms)


def test_read_vocabulary_parses_comments_blanks_and_duplicates(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("# my terms\n\nzebra\n  striped zebra  \nzebra\n")
    assert names.read_vocabulary(f) == ["zebra", "striped zebra"]
    # extension appends new terms after the packaged ones
    terms = names.load_vocabulary([f])
    assert terms[-2:] == ["zebra", "striped zebra"]
    assert names.load_vocabulary([f], include_default=False) == ["zebra", "striped zebra"]


def test_read_vocabulary_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        names.read_vocabulary(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="empty.txt holds no terms"):
        names.read_vocabulary(empty)
    braces = tmp_path / "b.txt"
    braces.write_text("ok\na {} b\n")
    with pytest.raises(ValueError, match="b.txt, line 2"):
        names.read_vocabulary(braces)


def test_rank_terms_by_cosine_by_hand():
    terms = ["a", "b", "c"]
    term_emb = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])  # norms need not be 1
    out = names.rank_terms(np.array([3.0, 0.0]), term_emb, terms, top=3)
    assert [r["term"] for r in out] == ["b", "c", "a"]
    np.testing.assert_allclose([r["score"] for r in out], [1.0, np.sqrt(0.5), 0.0], atol=1e-12)
    assert len(names.rank_terms(np.array([1.0, 0.0]), term_emb, terms, top=1)) == 1


def test_name_features_uses_the_text_tower():
    from ravl_pipeline.core.scores import class_text_embeddings
    from ravl_pipeline.models import load_model

    lm = load_model("ravl-tiny-rn", seed=0)
    terms = ["red square", "blue circle", "green triangle", "dog"]
    rng = np.random.default_rng(0)
    region_emb = rng.standard_normal((5, lm.model_cfg["embed_dim"])).astype(np.float32)
    region_emb /= np.linalg.norm(region_emb, axis=1, keepdims=True)
    features = [Feature(rank=1, cluster_id=7, score=1.0, influence=1.0, medoid=3),
                Feature(rank=2, cluster_id=2, score=0.5, influence=1.0, medoid=0)]
    named = names.name_features(features, lm, region_emb, terms, top=2)
    assert set(named) == {7, 2}  # keyed by cluster id
    assert all(f.names is None for f in features)  # a result is returned; the features are left as they were
    text = class_text_embeddings(lm, terms, ["a photo of a {}."]).numpy()
    for cluster_id, medoid in ((7, 3), (2, 0)):
        got = named[cluster_id]
        assert got["model_derived"] is True and got["template"] == "a photo of a {}."
        sims = text @ region_emb[medoid]
        best = np.argsort(-sims)[:2]
        assert [t["term"] for t in got["terms"]] == [terms[j] for j in best]
        np.testing.assert_allclose([t["score"] for t in got["terms"]], sims[best], atol=1e-5)
    assert names.name_features([], lm, region_emb, terms) == {}
    with pytest.raises(ValueError, match="placeholder"):
        names.name_features(features, lm, region_emb, terms, template="no slot")
