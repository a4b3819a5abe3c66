"""A synthetic screener data set in the competition's layout, made with espeak-ng.

The real recordings are children's and cannot be shared, yet the whole pipeline
(preprocessing, training, inference, scoring) has to be runnable and testable by anyone.
This module writes a stand-in with the same files and columns: "children" are espeak-ng
voices with raised pitch, varied accents, speaking rates, gains, background noise and
leading/trailing silence; wrong answers are the mistakes screeners actually see (saying
the whole word, sounding out instead of blending, changing a phoneme, dropping a word,
mumbling or saying nothing), more of them for younger grades and harder tasks; and a
few labels are flipped, as human scorers disagree.

Every clip is made from its own random generator seeded by (seed, split, index) and
espeak-ng output is a pure function of its input (see readaloud.tts), so the bytes
written depend only on the arguments, not on the number of worker processes.
"""
from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from scipy.fft import next_fast_len
from scipy.signal import butter, firwin, resample_poly, sosfilt

from readaloud.tts import EspeakTTS

GENERATOR_VERSION = "1.0.0"

TASKS = ("deletion", "blending", "nonword_repetition", "sentence_repetition")
GRADES = ("KG", "1", "2", "3")
SPLITS = ("train", "test")
TASK_WEIGHTS = (0.25, 0.25, 0.25, 0.25)

METADATA_COLUMNS = ("filename", "task", "expected_text", "grade")
LABEL_COLUMNS = ("filename", "score")

# --- how often children get it wrong -----------------------------------------------------
# P(wrong) = task base + grade shift; averages to ~41% wrong, i.e. ~59% correct.
TASK_ERROR_RATE = {"deletion": 0.38, "blending": 0.32, "nonword_repetition": 0.46, "sentence_repetition": 0.48}
GRADE_ERROR_SHIFT = {"KG": 0.14, "1": 0.05, "2": -0.05, "3": -0.14}
NO_SPEECH_SHARE = 0.08  # of wrong answers: silence (only room noise) or unintelligible mumbling
FILLER_RATE = 0.06  # "um ..." before the answer; does not change the score
DEFAULT_FLIP_RATE = 0.03  # scorer disagreement

# --- recording conditions ------------------------------------------------------------------
SAMPLE_RATES = (16000, 22050, 44100, 8000)
SAMPLE_RATE_WEIGHTS = (0.85, 0.05, 0.05, 0.05)
NOISE_KINDS = ("white", "pink", "brown", "babble")
NOISE_WEIGHTS = (0.2, 0.35, 0.15, 0.3)
SNR_DB = (5.0, 30.0)
PAD_SECONDS = (0.1, 1.5)

# --- "children" ----------------------------------------------------------------------------
LANGUAGES = ("en-us", "en-us-nyc", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan",
             "en-gb-x-gbcwmd", "en-029")
LANGUAGE_WEIGHTS = (0.46, 0.08, 0.09, 0.06, 0.08, 0.07, 0.07, 0.09)
# higher-pitched variants sound most like children; lower ones get the top of the pitch range
HIGH_VARIANTS = ("f1", "f2", "f3", "f4", "f5", "Annie", "anika", "Alicia", "Andrea", "belinda",
                 "linda", "steph", "shelby", "zac", "whisperf")
LOW_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "Andy", "max", "travis", "Jacky",
                "klatt", "klatt3", "klatt4")
HIGH_VARIANT_SHARE = 0.7
GRADE_PITCH = {"KG": (80, 99), "1": (74, 99), "2": (68, 96), "3": (60, 92)}
GRADE_RATE = {"KG": (110, 165), "1": (120, 175), "2": (128, 185), "3": (135, 190)}
PITCH_RANGE = (30, 90)

# --- screener content ------------------------------------------------------------------------


@dataclass(frozen=True)
class DeletionItem:
    """'Say <word> without <removed>' -> <response>; <distractor> is a plausible wrong word.

    A removed sound is written between slashes in espeak phoneme mnemonics ("/k/")."""

    word: str
    removed: str
    response: str
    distractor: str


def _deletions(rows: str) -> tuple[DeletionItem, ...]:
    return tuple(DeletionItem(*line.split()) for line in rows.strip().splitlines())


DELETION_ITEMS = _deletions("""
cowboy cow boy toy
cowboy boy cow car
sunflower sun flower power
rainbow rain bow boat
baseball base ball bell
cupcake cup cake lake
football foot ball bowl
toothbrush tooth brush bush
bedroom bed room broom
popcorn pop corn horn
snowman snow man men
airplane air plane plan
butterfly butter fly flag
doghouse dog house mouse
hotdog hot dog dig
mailbox mail box fox
starfish star fish dish
sailboat sail boat goat
pancake pan cake cook
raincoat coat rain ran
playground play ground round
backpack back pack pick
goldfish gold fish wish
seashell sea shell bell
bathtub bath tub tab
moonlight moon light night
cookbook cook book look
notebook note book hook
birthday birth day way
fireman fire man moon
cat /k/ at it
smile /s/ mile mail
snail /s/ nail nap
stop /s/ top tap
spin /s/ pin pan
clap /k/ lap lip
bring /b/ ring rang
flag /f/ lag log
play /p/ lay low
train /t/ rain ran
meat /m/ eat it
farm /f/ arm art
boat /b/ oat out
seat /t/ sea say
cart /t/ car core
nice /n/ ice eyes
slip /l/ sip sap
blend /l/ bend band
frog /r/ fog fig
plan /l/ pan pen
swing /w/ sing song
tent /t/ ten tan
bark /k/ bar bee
coat /k/ oat out
gate /g/ ate eat
mice /m/ ice ace
pink /p/ ink ant
bus /b/ us is
fox /f/ ox ax
snap /n/ sap sip
""")


@dataclass(frozen=True)
class BlendingItem:
    """Sounds (or syllables) are given and the child says the <word>.

    <syllables> are speakable spellings for syllable blends; empty means the parts are the
    word's phonemes. <near> is a word a child who mis-blends tends to say instead."""

    word: str
    near: str
    syllables: tuple[str, ...] = ()


def _blendings(rows: str) -> tuple[BlendingItem, ...]:
    items = []
    for line in rows.strip().splitlines():
        word, near, *syllables = line.split()
        items.append(BlendingItem(word, near, tuple(syllables)))
    return tuple(items)


BLENDING_ITEMS = _blendings("""
cat cap
ship shop
frog fog
dog dig
sun sum
map mop
pig big
fish fist
bed bad
cup cut
hat hot
top tip
bus bun
net nut
rug rag
jam jet
van fan
web wet
zip zap
lamp limp
milk silk
hand band
nest net
stop step
clap clip
flag flat
drum drip
swim slim
crab cab
chip chop
moon man
boat bat
rain ran
feet fat
kite cat
tree three
green grin
sunset subset sun set
rabbit ribbon rab bit
pencil parcel pen sill
napkin napping nap kin
basket blanket bass kit
picnic panic pick nick
muffin mitten muff fin
kitten mitten kit ten
window widow win doe
robot rowboat row bot
""")

NONWORD_FIXED = (
    "koovnorb", "blick", "tafsip", "naib", "vope", "dake", "zog", "mip", "plim", "frint",
    "glarp", "skeb", "jitbo", "nalbeck", "fepodar", "tiblem", "sloob", "prindle", "woogalamic",
    "dorpel", "vinchet", "glorbin", "tesh", "yimbat", "shlorp", "mazzle", "bordinex", "skrimble",
    "plonter", "fusk", "wug", "hapsitol", "zendrop", "gleb", "chowdle", "lorpin",
)
# spelling units for generated pseudo-words: clusters only where English allows them
_ONSETS = ("b", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "ch", "sh", "bl", "br", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "sk",
           "sl", "sn", "sp", "st", "tr")
_LATER_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ee", "ai", "oa")
_SHORT_VOWELS = ("a", "e", "i", "o", "u")
_MIDDLE_CODAS = ("", "", "m", "n", "l", "r", "s", "f", "k", "p")
_FINAL_CODAS = ("b", "d", "g", "k", "m", "n", "p", "t", "sk", "mp", "nd", "nt", "lt", "lk", "ft",
                "st", "rb", "rp", "rn", "rk", "sh", "ch")
_SYLLABLE_COUNTS = (1, 2, 3)
_SYLLABLE_WEIGHTS = (0.35, 0.45, 0.2)
N_GENERATED_NONWORDS = 40
# real words the generator must not produce (it is short-syllable English, so collisions happen)
_REAL_WORDS = frozenset("""
bad bag ban bat bed beg bet big bin bit bob bog bud bug bum bun bus but cab cad can cap cat cob
cod cog con cop cot cub cud cup cut dab dad dam den did dig dim din dip dog don dot dub dud dug
fab fad fan fat fed fen fib fig fin fit fob fog fun fur gab gag gap gas get gig gin god got gum
gun gut had ham hat hem hen hid him hip hit hob hog hop hot hub hug hum hut jab jam jet jig job jog
jot jug jut keg kid kin kit lab lad lag lap led leg let lid lip lit lob log lot lug mad man map
mat men met mid mob mop mud mug mum nab nag nap net nib nip nod not nub nut pad pan pat peg pen
pet pig pin pit pod pop pot pub pun pup put rag ram ran rap rat red rib rid rig rim rip rob rod
rot rub rug rum run rut sad sag sat set sin sip sit sob sod sop sub sum sun tab tag tan tap ten
tin tip top tot tub tug van vat vet wag wed wet wig win wit wok zap zip bank belt best bump bunk
damp desk dent dust fast felt gift hand hint hunt just kept land lamp last lent lift link loft
lost melt milk mint mist must nest pant past pest pink pump rank rent rest rust sank sent silk
sink tank tent test tilt went wind chip chop shop ship shot shut bash cash dash dish fish gush
hash hush lash mash mush push rash rush wish rich much such bench lunch munch punch bunch
boot book cook cool food fool good hood hook look loop moon mood noon pool roof room soon tool
zoo beef beet deep feed feel feet heel jeep keep meet need peek peel reed seed seek seem seen
sheep sheet teen weed week weep bait gain hail jail maid mail main nail paid pail pain raid rail
rain sail tail wait boat coat goat load loaf moan oak road soap toad blob club crab drum flag
flat frog glad grab grin plan plot plum slam slip snap snip spin spit spot stem step stop trap
trip brag brim drip drop flip grip clump frump plump stump slump
dump lump bump jump hump pump rump sump
chain brain drain grain train plain stain snail trail sheep sleep steep creep green queen sheen
spoon spool stool broom groom bloom gloom skip whip crop flop plop prop slop nosh gosh josh posh
clash crash flash slash smash trash fresh flesh brush crush flush plush slush blush chest crest
west vest zest blast cast mast vast torn corn born barn darn yarn bark dark park mark lark fork
pork cork stork work perk jerk harp sharp carp burp chirp curb herb verb blurb pelt welt bolt colt
jolt molt salt halt malt kilt silt wilt hilt gilt quilt bulk hulk sulk elk folk yolk raft craft
draft shaft left theft rift shift sift soft tuft disk risk task mask cask flask dusk husk musk
tusk whisk brisk frisk ramp camp champ clamp cramp stamp tramp blimp chimp skimp romp stomp chomp
band sand stand bend lend mend send tend spend trend bond fond pond blond fund pant chant plant
slant dent vent spent lint tint print sprint stint font punt runt blunt grunt stunt which drench
french clench pinch winch crunch hunch church perch birch torch porch march arch starch
""".split())

SENTENCES = (
    "the dog ran to the park", "my cat likes to sleep", "we went to the store",
    "she has a red ball", "the bird sat on the tree", "i can see the big bus",
    "he likes to eat apples", "the sun is hot today", "my mom made a cake",
    "the fish swims in the pond", "we play in the snow", "the baby is sleeping",
    "dad reads me a book", "the frog jumped into the water", "i lost my blue hat",
    "the girl rode her bike", "they went to the beach", "the cow eats green grass",
    "my friend has a puppy", "the boy kicked the ball", "we sing songs at school",
    "the duck swims in the lake", "grandma bakes cookies on sunday", "the little mouse ran away",
    "i brush my teeth every night", "the teacher reads a story", "it is raining outside",
    "the horse runs very fast", "my sister likes to dance", "we eat lunch at noon",
    "the moon is bright tonight", "the truck is big and loud", "the kite flew up high",
    "he put on his warm coat", "the flowers are yellow", "i want to play outside",
    "the bear is in the woods", "my shoes are too small", "the bell rang at school",
    "she gave me a hug", "the pig rolled in the mud", "we planted a tree",
    "the clock is on the wall", "my brother can swim", "the cookies are in the jar",
)
# the substitutions children make when repeating (meaning-preserving or sound-alike)
SENTENCE_SUBSTITUTES = {
    "dog": "cat", "cat": "dog", "ran": "went", "park": "yard", "store": "shop", "red": "blue",
    "blue": "red", "ball": "bell", "bird": "bug", "tree": "bush", "big": "small", "small": "big",
    "eat": "ate", "apples": "apple", "hot": "warm", "cake": "cookie", "fish": "fishes",
    "pond": "lake", "lake": "pond", "snow": "rain", "baby": "babies", "sleeping": "sleepy",
    "book": "story", "jumped": "jumps", "water": "pool", "hat": "cap", "girl": "boy", "boy": "girl",
    "bike": "bikes", "beach": "sea", "cow": "cows", "eats": "ate", "grass": "grasses",
    "puppy": "doggy", "kicked": "kicks", "sing": "sang", "songs": "song", "school": "class",
    "duck": "ducks", "cookies": "cookie", "little": "tiny", "mouse": "mice", "night": "day",
    "teacher": "mommy", "raining": "rainy", "horse": "house", "fast": "quick", "sister": "brother",
    "brother": "sister", "dance": "dancing", "lunch": "dinner", "noon": "night", "moon": "sun",
    "bright": "big", "truck": "car", "loud": "noisy", "kite": "plane", "high": "up", "warm": "big",
    "coat": "jacket", "flowers": "flower", "yellow": "pretty", "play": "go", "bear": "bee",
    "woods": "forest", "shoes": "socks", "bell": "bus", "hug": "kiss", "pig": "dog", "mud": "dirt",
    "planted": "plant", "clock": "picture", "wall": "table", "swim": "run", "jar": "box",
    "mom": "dad", "dad": "mom", "friend": "friends", "today": "now", "story": "book",
}
_FUNCTION_WORDS = frozenset("the a an to in on at my his her is are and of me we he she i it they up".split())
FILLERS = ("um", "uh", "hmm")
# what adults in the background say (kept apart from the items, so noise never answers for the child)
BABBLE_TEXTS = (
    "okay everyone please sit down", "can you hand me that paper", "we will go outside after lunch",
    "where did you put the markers", "line up at the door please", "it is time to clean up now",
    "who wants to read next", "remember to write your name", "quiet voices in the hallway",
    "the bus leaves at three o'clock",
)
_MUMBLE_SYLLABLES = ("ba", "da", "ma", "na", "ga", "bu", "mu", "ni", "di", "wa", "la", "mo", "nu", "ee", "oh")


def nonword_items() -> tuple[str, ...]:
    """The fixed pseudo-word list plus words generated from spelling patterns (fixed seed,
    so every data set uses the same items, as a real screener does)."""
    return _nonword_items()


@lru_cache(maxsize=1)
def _nonword_items() -> tuple[str, ...]:
    rng = np.random.default_rng(20240607)
    words = list(NONWORD_FIXED)
    seen = set(words) | _REAL_WORDS
    while len(words) < len(NONWORD_FIXED) + N_GENERATED_NONWORDS:
        syllables = _pick(rng, _SYLLABLE_COUNTS, _SYLLABLE_WEIGHTS)
        word = _pick(rng, _ONSETS) + _pick(rng, _VOWELS)
        for _ in range(syllables - 1):
            word += _pick(rng, _MIDDLE_CODAS) + _pick(rng, _LATER_ONSETS) + _pick(rng, _SHORT_VOWELS)
        word += _pick(rng, _FINAL_CODAS)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return tuple(words)


# --- planning one clip -------------------------------------------------------------------------


@dataclass
class _Voice:
    language: str
    variant: str
    rate: int
    pitch: int
    pitch_range: int
    word_gap: int

    @property
    def spec(self) -> str:
        return f"{self.language}+{self.variant}"

    def tts(self, rate: int | None = None) -> EspeakTTS:
        return EspeakTTS(self.spec, rate=rate or self.rate, pitch=self.pitch,
                         pitch_range=self.pitch_range, word_gap=self.word_gap)


@dataclass
class _Clip:
    """What the child says: ``parts`` are spoken separately with pauses in between."""

    task: str
    grade: str
    expected_text: str
    correct: bool
    kind: str
    parts: list[str] = field(default_factory=list)
    mumble: bool = False


def _pick(rng: np.random.Generator, options, weights=None):
    if weights is None:
        return options[int(rng.integers(len(options)))]
    return options[int(rng.choice(len(options), p=np.asarray(weights) / np.sum(weights)))]


def _pick_kind(rng: np.random.Generator, kinds: dict[str, float]) -> str:
    names = tuple(kinds)
    return _pick(rng, names, tuple(kinds.values()))


def error_rate(task: str, grade: str) -> float:
    """P(the child answers wrong) for a task and grade."""
    return min(0.9, max(0.05, TASK_ERROR_RATE[task] + GRADE_ERROR_SHIFT[grade]))


_VOWEL_MNEMONIC_STARTS = frozenset("aAeEiIoOuUV03@")  # espeak's English vowel names start so


def _is_vowel(mnemonic: str) -> bool:
    return mnemonic[:1] in _VOWEL_MNEMONIC_STARTS


def _sound(mnemonic: str) -> str:
    """How a child says one phoneme in isolation: consonants get a schwa ("kuh")."""
    return f"[['{mnemonic}]]" if _is_vowel(mnemonic) else f"[[{mnemonic}@]]"


def _sounded_out(word: str, tts: EspeakTTS) -> list[str]:
    return [_sound(p) for p in tts.phonemize(word, ipa=False)]


def _deletion(rng, item: DeletionItem, correct: bool) -> tuple[str, list[str]]:
    if correct:
        return "correct", [item.response]
    kind = _pick_kind(rng, {"whole_word": 0.35, "removed_part": 0.3, "other_word": 0.35})
    if kind == "whole_word":
        return kind, [item.word]
    if kind == "removed_part":
        part = item.removed
        return kind, [_sound(part.strip("/")) if part.startswith("/") else part]
    return kind, [item.distractor]


def _blending(rng, item: BlendingItem, correct: bool, tts: EspeakTTS) -> tuple[str, list[str]]:
    if correct:
        return "correct", [item.word]
    kind = _pick_kind(rng, {"sounded_out": 0.45, "near_word": 0.4, "first_part": 0.15})
    parts = list(item.syllables) if item.syllables else _sounded_out(item.word, tts)
    if kind == "sounded_out":
        return kind, parts
    if kind == "first_part":
        return kind, parts[:1]
    return kind, [item.near]


_CONFUSABLE = {"b": "dp", "d": "bt", "p": "bt", "t": "dk", "k": "tg", "g": "kd", "f": "v",
               "v": "fb", "s": "zf", "z": "sv", "m": "n", "n": "m", "l": "r", "r": "lw", "j": "g",
               "w": "v", "h": "f", "c": "t", "x": "s"}
_ADDED_SYLLABLES = ("ta", "po", "ni", "ka", "lo", "mi")
_CONSONANTS = set("bcdfghjklmnpqrstvwxz")


def _change_nonword(rng, word: str, kind: str) -> tuple[str, str]:
    """One spelling edit that changes, drops or adds a sound: (kind actually done, new spelling)."""
    letters = list(word)
    positions = [i for i, c in enumerate(letters) if c in _CONFUSABLE
                 and not (i + 1 < len(letters) and letters[i + 1] == "h")
                 and not (c == "c" and i + 1 < len(letters) and letters[i + 1] == "k")]
    if kind == "changed_sound" and positions:
        i = _pick(rng, positions)
        letters[i] = _pick(rng, _CONFUSABLE[letters[i]])
        return kind, "".join(letters)
    if kind == "dropped_sound":
        # a consonant in a cluster or at the end: "frint" -> "fint", "glarp" -> "glar"
        droppable = [i for i in positions if i == len(letters) - 1
                     or (i + 1 < len(letters) and letters[i + 1] in _CONSONANTS)
                     or (i > 0 and letters[i - 1] in _CONSONANTS)]
        if droppable:
            i = _pick(rng, droppable)
            return kind, "".join(letters[:i] + letters[i + 1:])
    syllable = _pick(rng, _ADDED_SYLLABLES)
    return "added_sound", word + syllable if rng.random() < 0.6 else syllable + word


def _nonword(rng, word: str, correct: bool, tts: EspeakTTS) -> tuple[str, list[str]]:
    if correct:
        return "correct", [word]
    wanted = _pick_kind(rng, {"changed_sound": 0.4, "dropped_sound": 0.3, "added_sound": 0.3})
    target = tts.phonemize(word)
    for _ in range(8):  # the edit must be audible, not just a spelling change
        kind, said = _change_nonword(rng, word, wanted)
        if said and said != word and tts.phonemize(said) != target:
            return kind, [said]
    return "added_sound", [word + _pick(rng, _ADDED_SYLLABLES)]


def _sentence(rng, sentence: str, correct: bool) -> tuple[str, list[str]]:
    if correct:
        return "correct", [sentence]
    words = sentence.split()
    content = [i for i, w in enumerate(words) if w not in _FUNCTION_WORDS]
    kind = _pick_kind(rng, {"dropped_word": 0.4, "swapped_words": 0.25, "substituted_word": 0.35})
    if kind == "swapped_words":
        pairs = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
        i = _pick(rng, pairs)
        words[i], words[i + 1] = words[i + 1], words[i]
    elif kind == "dropped_word":
        del words[_pick(rng, content or list(range(len(words))))]
    else:  # every sentence has at least one word with a listed substitute
        i = _pick(rng, [i for i, w in enumerate(words) if w in SENTENCE_SUBSTITUTES])
        words[i] = SENTENCE_SUBSTITUTES[words[i]]
    return kind, [" ".join(words)]


def _choose_voice(rng, grade: str) -> _Voice:
    language = _pick(rng, LANGUAGES, LANGUAGE_WEIGHTS)
    high = rng.random() < HIGH_VARIANT_SHARE
    variant = _pick(rng, HIGH_VARIANTS if high else LOW_VARIANTS)
    low_pitch, high_pitch = GRADE_PITCH[grade]
    if not high:  # lower-pitched variants need the top of the range to sound young
        low_pitch = max(low_pitch, 88)
    pitch = int(rng.integers(low_pitch, high_pitch + 1))
    rate = int(rng.integers(GRADE_RATE[grade][0], GRADE_RATE[grade][1] + 1))
    pitch_range = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
    word_gap = int(rng.integers(1, 6)) if rng.random() < 0.2 else 0  # word-by-word readers
    return _Voice(language, variant, rate, pitch, pitch_range, word_gap)


def _plan_task(rng, task: str, grade: str, voice: _Voice) -> _Clip:
    """Pick an item, decide whether this child gets it right, and what they say instead."""
    correct = bool(rng.random() >= error_rate(task, grade))
    no_speech = not correct and rng.random() < NO_SPEECH_SHARE
    tts = voice.tts()
    if task == "deletion":
        item = _pick(rng, DELETION_ITEMS)
        expected = item.response
        kind, parts = _deletion(rng, item, correct)
    elif task == "blending":
        item = _pick(rng, BLENDING_ITEMS)
        expected = item.word
        kind, parts = _blending(rng, item, correct, tts)
    elif task == "nonword_repetition":
        expected = _pick(rng, nonword_items())
        kind, parts = _nonword(rng, expected, correct, tts)
    else:
        expected = _pick(rng, SENTENCES)
        kind, parts = _sentence(rng, expected, correct)
    clip = _Clip(task, grade, expected, correct, kind, parts)
    if no_speech:
        if rng.random() < 0.5:
            clip.kind, clip.parts = "silence", []
        else:
            n = int(rng.integers(2, 6))
            clip.kind, clip.mumble = "mumble", True
            clip.parts = [" ".join(_pick(rng, _MUMBLE_SYLLABLES) for _ in range(n))]
    elif rng.random() < FILLER_RATE:
        clip.parts = [_pick(rng, FILLERS)] + clip.parts
    return clip


# --- rendering -----------------------------------------------------------------------------------


def _trim(audio: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    """Cut espeak's own silence; the clip's silence is added later, on purpose."""
    loud = np.flatnonzero(np.abs(audio) > threshold * max(float(np.max(np.abs(audio), initial=0.0)), 1e-9))
    return audio[loud[0]: loud[-1] + 1] if loud.size else audio[:0]


@lru_cache(maxsize=8)
def _resampling_filter(up: int, down: int) -> np.ndarray:
    """resample_poly's own default filter, designed once per ratio instead of per call."""
    max_rate = max(up, down)
    return firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))


def _resample(audio: np.ndarray, source: int, target: int) -> np.ndarray:
    if source == target:
        return audio.astype(np.float64)
    g = math.gcd(source, target)
    up, down = target // g, source // g
    return resample_poly(audio.astype(np.float64), up, down, window=_resampling_filter(up, down))


def _colored_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise whose power falls as 1/f**exponent (0 white, 1 pink, 2 brown), unit RMS."""
    if not exponent:
        return rng.standard_normal(n)
    size = next_fast_len(n, real=True)  # clip lengths are often prime: slow FFTs
    spectrum = np.fft.rfft(rng.standard_normal(size))
    freqs = np.fft.rfftfreq(size)
    spectrum[1:] /= freqs[1:] ** (exponent / 2)
    spectrum[0] = 0.0
    noise = np.fft.irfft(spectrum, size)[:n]
    return noise / max(float(np.sqrt(np.mean(noise ** 2))), 1e-12)


_BABBLE_SECONDS = 12.0


@lru_cache(maxsize=1)
def _babble_22k() -> np.ndarray:
    """A loop of several adults talking at once (fixed content; cached per process)."""
    rng = np.random.default_rng(7)
    talkers = [("en-us+m1", 45), ("en-us+f2", 55), ("en-gb+m3", 40), ("en-us+f4", 60), ("en-029+m5", 50)]
    n = int(_BABBLE_SECONDS * 22050)
    mix = np.zeros(n)
    for voice, pitch in talkers:
        tts = EspeakTTS(voice, rate=175, pitch=pitch)
        stream = []
        length = 0
        while length < n:
            speech = _trim(tts.synthesize(_pick(rng, BABBLE_TEXTS)))
            stream += [speech, np.zeros(int(rng.integers(1000, 6000)))]
            length += speech.size + stream[-1].size
        talker = np.concatenate(stream)[:n]
        mix += np.roll(talker, int(rng.integers(n)))
    return mix / float(np.sqrt(np.mean(mix ** 2)))


@lru_cache(maxsize=len(SAMPLE_RATES))
def _babble(sample_rate: int) -> np.ndarray:
    bank = _resample(_babble_22k(), 22050, sample_rate)
    return bank / float(np.sqrt(np.mean(bank ** 2)))


def _noise(rng: np.random.Generator, kind: str, n: int, sample_rate: int) -> np.ndarray:
    if kind == "babble":
        bank = _babble(sample_rate)
        start = int(rng.integers(bank.size))
        return np.take(bank, np.arange(start, start + n), mode="wrap") + 0.05 * rng.standard_normal(n)
    return _colored_noise(rng, n, {"white": 0.0, "pink": 1.0, "brown": 2.0}[kind])


@dataclass
class _Recording:
    sample_rate: int
    noise: str
    audio: np.ndarray  # int16


def _render(rng: np.random.Generator, clip: _Clip, voice: _Voice, sample_rate: int | None = None) -> _Recording:
    """Speak the clip's parts and make it sound recorded: resampling, gain, pauses, noise."""
    sample_rate = sample_rate or _pick(rng, SAMPLE_RATES, SAMPLE_RATE_WEIGHTS)
    pieces: list[np.ndarray] = []
    source_rate = 22050
    if clip.parts:
        tts = voice.tts(rate=int(rng.integers(330, 451)) if clip.mumble else None)
        source_rate = tts.sample_rate
        for i, text in enumerate(clip.parts):
            if i:
                pieces.append(np.zeros(int(rng.uniform(0.25, 0.9) * source_rate)))
            pieces.append(_trim(tts.synthesize(text)))
    speech = _resample(np.concatenate(pieces), source_rate, sample_rate) if pieces else np.zeros(0)

    level = 10 ** (rng.uniform(-16.0, -2.0) / 20)  # peak level of normal speech: random gain
    if speech.size and np.max(np.abs(speech)) > 0:
        speech *= level / np.max(np.abs(speech))
        reference_rms = float(np.sqrt(np.mean(speech ** 2)))
    else:  # silence: invent the level the child would have spoken at
        speech = np.zeros(int(rng.uniform(0.5, 2.5) * sample_rate))
        reference_rms = level * 0.18
    if clip.mumble:
        cutoff = rng.uniform(300.0, 800.0)
        speech = sosfilt(butter(4, cutoff, fs=sample_rate, output="sos"), speech)
        speech *= rng.uniform(0.08, 0.35) * reference_rms / max(float(np.sqrt(np.mean(speech ** 2))), 1e-12)

    lead, trail = (int(rng.uniform(*PAD_SECONDS) * sample_rate) for _ in range(2))
    signal = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    noise_kind = _pick(rng, NOISE_KINDS, NOISE_WEIGHTS)
    snr_db = float(rng.uniform(*SNR_DB))
    signal += _noise(rng, noise_kind, signal.size, sample_rate) * reference_rms / 10 ** (snr_db / 20)
    peak = float(np.max(np.abs(signal)))
    if peak > 0.99:  # a recorder's limiter, not clipping
        signal *= 0.99 / peak
    audio = np.round(signal * 32767).astype(np.int16)
    return _Recording(sample_rate, noise_kind, audio)


def speak_like_a_child(text: str, rng: np.random.Generator, grade: str | None = None,
                       sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """`text` said by a random child-like espeak voice, recorded as the demo's clips are.

    Returns (int16 audio, sample rate). Used to make unlimited labelled speech for
    pretraining (readaloud.pipeline.pretraining), with the same voices, noise and levels as the demo.
    """
    grade = grade or _pick(rng, GRADES)
    voice = _choose_voice(rng, grade)
    clip = _Clip("pretraining", grade, text, True, "pretraining", [text])
    recording = _render(rng, clip, voice, sample_rate)
    return recording.audio, recording.sample_rate


def lexicon() -> tuple[str, ...]:
    """Every word, response and sentence the demo's item bank can say (pretraining texts)."""
    texts = set()
    for item in DELETION_ITEMS:
        texts.update((item.word, item.response, item.distractor))
        if not item.removed.startswith("/"):  # a sound in phoneme mnemonics is no text
            texts.add(item.removed)
    for item in BLENDING_ITEMS:
        texts.update((item.word, item.near))
    texts.update(nonword_items())
    texts.update(SENTENCES)
    return tuple(sorted(texts))


# --- one clip, end to end --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    out_dir: str
    seed: int
    split: str
    index: int
    filename: str
    flip_rate: float


def _make_clip(job: _Job) -> dict[str, Any]:
    """Plan, synthesize and write one clip; return its metadata row (runs in workers)."""
    rng = np.random.default_rng([job.seed, SPLITS.index(job.split), job.index])
    task = _pick(rng, TASKS, TASK_WEIGHTS)
    grade = _pick(rng, GRADES)
    voice = _choose_voice(rng, grade)
    clip = _plan_task(rng, task, grade, voice)
    recording = _render(rng, clip, voice)
    flipped = bool(rng.random() < job.flip_rate)
    sf.write(os.path.join(job.out_dir, job.filename), recording.audio, recording.sample_rate,
             subtype="PCM_16", format="WAV")
    return {
        "filename": job.filename, "split": job.split, "task": clip.task, "grade": clip.grade,
        "expected_text": clip.expected_text, "correct": clip.correct, "flipped": flipped,
        "score": int(clip.correct) ^ int(flipped), "kind": clip.kind, "voice": voice.spec,
        "language": voice.language, "variant": voice.variant, "sample_rate": recording.sample_rate,
        "noise": recording.noise, "duration": recording.audio.size / recording.sample_rate,
    }


def _filenames(seed: int, count: int) -> list[str]:
    """Random-looking, unique, deterministic names (8 lowercase letters)."""
    rng = np.random.default_rng([seed, 1_000_003])
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = "".join(letters[rng.integers(0, 26, 8)]) + ".wav"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


# --- the data set ------------------------------------------------------------------------------------


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row[c] for c in columns])


def _remove_previous(out_dir: Path) -> None:
    """With overwrite: delete the clips an earlier run listed, so no stale wavs linger."""
    for name in ("train_metadata.csv", "test_metadata.csv"):
        path = out_dir / name
        if not path.exists():
            continue
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                wav = out_dir / os.path.basename(row.get("filename") or "")
                if wav.suffix == ".wav" and wav.is_file():
                    wav.unlink()


def _rates(rows: list[dict[str, Any]], key: str, value: str = "correct") -> dict[str, float]:
    groups: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        groups[row[key]].append(int(row[value]))
    order = TASKS if key == "task" else GRADES if key == "grade" else sorted(groups)
    return {k: round(float(np.mean(groups[k])), 4) for k in order if k in groups}


def _info(rows: list[dict[str, Any]], seed: int, n_train: int, n_test: int, flip_rate: float) -> dict[str, Any]:
    n = len(rows)
    wrong = [r for r in rows if not r["correct"]]
    flipped = {split: sum(r["flipped"] for r in rows if r["split"] == split) for split in SPLITS}
    by_task_grade = {
        task: {grade: round(1 - float(np.mean(v)), 4) if (v := [r["correct"] for r in rows
               if r["task"] == task and r["grade"] == grade]) else None for grade in GRADES}
        for task in TASKS
    }
    return {
        "generator": "readaloud.demo",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "counts": {"train": n_train, "test": n_test, "total": n,
                   "by_task": dict(Counter(r["task"] for r in rows)),
                   "by_grade": dict(Counter(r["grade"] for r in rows))},
        "correct_rate": round(float(np.mean([r["correct"] for r in rows])), 4) if n else None,
        "score_rate": round(float(np.mean([r["score"] for r in rows])), 4) if n else None,
        "label_flip_rate": flip_rate,
        "labels_flipped": {**flipped, "total": sum(flipped.values())},
        "label_flip_rate_observed": round(sum(flipped.values()) / n, 4) if n else None,
        "error_rate_model": {task: {grade: round(error_rate(task, grade), 4) for grade in GRADES}
                             for task in TASKS},
        "error_rate_observed": {
            "by_task": {k: round(1 - v, 4) for k, v in _rates(rows, "task").items()},
            "by_grade": {k: round(1 - v, 4) for k, v in _rates(rows, "grade").items()},
            "by_task_and_grade": by_task_grade,
        },
        "response_kinds": dict(sorted(Counter(f"{r['task']}/{r['kind']}" for r in rows).items())),
        "no_speech_share_of_wrong": round(sum(r["kind"] in ("silence", "mumble") for r in wrong)
                                          / len(wrong), 4) if wrong else None,
        "voices": {
            "distinct": len({r["voice"] for r in rows}),
            "languages": dict(sorted(Counter(r["language"] for r in rows).items())),
            "variants": dict(sorted(Counter(r["variant"] for r in rows).items())),
        },
        "sample_rates": {str(k): v for k, v in sorted(Counter(r["sample_rate"] for r in rows).items())},
        "noise": dict(sorted(Counter(r["noise"] for r in rows).items())),
        "snr_db_range": list(SNR_DB),
        "silence_padding_seconds": list(PAD_SECONDS),
        "total_audio_hours": round(sum(r["duration"] for r in rows) / 3600, 3),
    }


def generate_demo_data(
    out_dir: str | Path,
    n_train: int = 3000,
    n_test: int = 600,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    flip_rate: float = DEFAULT_FLIP_RATE,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the synthetic data set into ``out_dir`` and return what demo_info.json holds.

    Files: train_metadata.csv, train_labels.csv, test_metadata.csv, test_labels.csv,
    submission_format.csv, demo_info.json and the wavs, flat. Raises FileExistsError if
    ``out_dir`` already holds a data set and ``overwrite`` is false.
    """
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ValueError(f"need a positive number of clips, got n_train={n_train}, n_test={n_test}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not 0.0 <= flip_rate < 0.5:
        raise ValueError(f"flip_rate must be in [0, 0.5), got {flip_rate}")
    out = Path(out_dir)
    if (out / "train_metadata.csv").exists():
        if not overwrite:
            raise FileExistsError(
                f"{out} already contains a data set (train_metadata.csv); "
                "choose another folder or pass --overwrite to replace it"
            )
        _remove_previous(out)
    out.mkdir(parents=True, exist_ok=True)

    names = _filenames(seed, n_train + n_test)
    jobs = [_Job(str(out), seed, "train", i, names[i], flip_rate) for i in range(n_train)]
    jobs += [_Job(str(out), seed, "test", i, names[n_train + i], flip_rate) for i in range(n_test)]

    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="synthesizing clips", unit="clip", disable=not progress)
    if workers == 1:
        rows = []
        for job in jobs:
            rows.append(_make_clip(job))
            bar.update()
    else:
        # spawn: each worker loads and initialises espeak-ng itself, whatever the parent holds
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(workers, len(jobs))) as pool:
            rows = []
            for row in pool.imap(_make_clip, jobs, chunksize=8):
                rows.append(row)
                bar.update()
            pool.close()  # let workers exit normally (and clean up) rather than be terminated
            pool.join()
    bar.close()

    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    _write_csv(out / "train_metadata.csv", METADATA_COLUMNS, train)
    _write_csv(out / "train_labels.csv", LABEL_COLUMNS, train)
    _write_csv(out / "test_metadata.csv", METADATA_COLUMNS, test)
    _write_csv(out / "test_labels.csv", LABEL_COLUMNS, test)
    _write_csv(out / "submission_format.csv", LABEL_COLUMNS, [{**r, "score": 0} for r in test])
    info = _info(rows, seed, n_train, n_test, flip_rate)
    info["summary"] = {
        "correct_rate_by_task": _rates(rows, "task"),
        "correct_rate_by_grade": _rates(rows, "grade"),
    }
    with open(out / "demo_info.json", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return info


def format_summary(info: dict[str, Any]) -> str:
    """A few lines for the terminal: counts, correct rates by task and grade, flips."""
    counts = info["counts"]
    summary = info["summary"]
    flipped = info["labels_flipped"]
    lines = [
        f"clips: {counts['train']} train + {counts['test']} test "
        f"({info['total_audio_hours']:.2f} h of audio, {info['voices']['distinct']} distinct voices)",
        f"correct rate: {info['correct_rate']:.1%} overall; score=1 rate after label flips: "
        f"{info['score_rate']:.1%}",
        "  by task:  " + ", ".join(f"{k} {v:.1%}" for k, v in summary["correct_rate_by_task"].items()),
        "  by grade: " + ", ".join(f"{k} {v:.1%}" for k, v in summary["correct_rate_by_grade"].items()),
        f"labels flipped: {flipped['total']} ({info['label_flip_rate_observed']:.1%}; "
        f"rate {info['label_flip_rate']:.1%})",
        "sample rates: " + ", ".join(f"{k} Hz: {v}" for k, v in info["sample_rates"].items()),
    ]
    return "\n".join(lines)


def run(out_dir: str | Path, n_train: int = 3000, n_test: int = 600, seed: int = 0, workers: int = 1,
        overwrite: bool = False, flip_rate: float = DEFAULT_FLIP_RATE) -> dict[str, Any]:
    """generate_demo_data with timing and the summary printed (what the CLI does)."""
    start = time.perf_counter()
    info = generate_demo_data(out_dir, n_train=n_train, n_test=n_test, seed=seed, workers=workers,
                              overwrite=overwrite, flip_rate=flip_rate)
    print(f"wrote the demo data set to {out_dir} in {time.perf_counter() - start:.1f} s")
    print(format_summary(info))
    return info
