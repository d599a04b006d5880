"""The built-in demo corpus: eight English accents spoken by seeded espeak-ng voices.

vox needs a corpus where the birthplace label is really in the audio, that anyone can build in a
minute without a download or a licence. espeak-ng ships accent voices for English (US, New York,
British, RP, Scottish, Lancaster, West Midlands, Caribbean) whose phoneme tables and rules differ
exactly where real accents differ (rhotic ``car``, the ``bath`` and ``goat`` vowels, ``water``,
``but``), so the birthplace head has something real to find. Each speaker is its own voice variant
(pitch, formants, breathiness, creak, jitter, speaking rate) so speaker and sex are learnable too,
and ``demo_voice_spread`` pulls the voices together to make the accent stand out across speakers.

Licensing: libespeak-ng is GPL-3.0. vox contains no espeak code; it loads the shared library at run
time from the separately installed ``espeakng-loader`` wheel (which bundles libespeak-ng 1.52 and its
data) through ctypes, only to generate demo audio. Speaker variant files go into a private temporary
copy of the data folder (symlinks plus our own ``voices/!v`` files); site-packages is never written.

Determinism: libespeak keeps global state between utterances (pitch-jitter phase, noise generator),
so the same sentence spoken twice in one process differs. Every speaker is therefore rendered in a
fresh worker process (``maxtasksperchild=1``) that speaks its utterances in a fixed order, which
makes the files byte-identical for identical settings. The main process never loads libespeak.

Layout of a corpus folder::

    manifest.csv     path,speaker,birthplace,sex  (the vox manifest contract)
    speakers.csv     each speaker's voice parameters, for reference
    utterances.csv   text, espeak phonemes (IPA) and augmentation settings of every clip
    wav/<speaker>/<speaker>_000.wav   16 kHz mono PCM16
    settings.json    written last: the completeness marker
"""
from __future__ import annotations

import csv
import ctypes
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import espeakng_loader
import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from voxlib import signals
from voxlib.cli import make_parser, parse, run_command
from voxlib.config import Config, ConfigError, outputs_dir, usable_cores

SAMPLE_RATE = 16000
CORPUS_VERSION = 2  # bump when the generator changes, so existing corpora are rebuilt

# birthplace label -> espeak-ng voice (a file under espeak-ng-data/lang/; British English is "en")
ACCENTS: dict[str, str] = {
    "us": "en-us",
    "us-nyc": "en-us-nyc",
    "gb": "en",
    "gb-rp": "en-gb-x-rp",
    "scotland": "en-gb-scotland",
    "lancaster": "en-gb-x-gbclan",
    "west-midlands": "en-gb-x-gbcwmd",
    "caribbean": "en-029",
}
# names people reach for that espeak spells differently
_ALIASES = {"en-gb": "gb", "en-gb-x-gbclan": "lancaster", "en-gb-x-gbcwmd": "west-midlands"}

# Voice ranges (low, high) per sex; demo_voice_spread scales them around their centres.
PITCH_BASE_HZ = {"female": (160.0, 240.0), "male": (75.0, 130.0)}
FORMANT_SCALE = {"female": (1.05, 1.20), "male": (0.92, 1.06)}
PITCH_TOP_RATIO = (1.30, 1.60)  # top of the intonation range / base pitch
BREATH = (0.0, 3.0)
ROUGHNESS = (0.0, 3.0)
FLUTTER = (1.0, 4.0)  # espeak's pitch jitter; 20 and above silences voicing
RATE_WPM = (140.0, 185.0)  # each speaker's central speaking rate
RATE_JITTER = 0.06  # per-utterance rate varies +-6 % around the speaker's centre

# Augmentation per utterance
SNR_DB = (20.0, 40.0)
PEAK_DBFS = (-12.0, -2.0)
RT60_S = (0.10, 0.35)
DRR_DB = (4.0, 14.0)  # direct-to-reverberant energy ratio of the synthetic room

SPEAKER_TIMEOUT_S = 600  # one speaker takes well under a second; this only catches a dead worker


class DemoCorpusError(RuntimeError):
    """The demo corpus cannot be built (missing espeak voice, silent synthesis, bad settings)."""


# --- sentences --------------------------------------------------------------------------------
# Words chosen for the vowels and consonants on which these accents differ: START/BATH/TRAP (car,
# bath, can't), LOT/THOUGHT (coffee, talk), GOAT, STRUT (but, mother), PRICE (I, time), NURSE,
# NEAR/SQUARE, rhotic r, t in water/butter, th, and h-dropping.
_WORDS: dict[str, list[str]] = {
    "person": ["mother", "father", "brother", "daughter", "aunt", "uncle", "neighbour", "nurse",
               "teacher", "partner", "grandad", "farmer"],
    "thing": ["car", "goat", "boat", "glass", "bath", "cup", "coat", "horse", "kite", "phone",
              "castle", "butter", "coffee", "chair", "letter", "clock", "shirt", "basket"],
    "adj": ["dark", "hot", "old", "large", "awful", "lovely", "brown", "hard", "tiny", "rather odd",
            "bright", "cold", "dirty", "smart"],
    "place": ["near the harbour", "by the river", "on the north road", "after the party",
              "at half past four", "under the bridge", "in the car park", "at the top of the hill",
              "on Thursday morning", "at the farm", "down the path", "behind the church"],
    "verb": ["bought", "caught", "painted", "carried", "parked", "watched", "found", "borrowed",
             "started", "dropped", "counted", "heard"],
}
_TEMPLATES = [
    "I can't find the {adj} {thing} that I left {place}.",
    "My {person} {verb} a {adj} {thing} {place} last year.",
    "Her {person} thought the {thing} {place} was far too {adj}.",
    "Why did your {person} leave the {adj} {thing} {place}?",
    "We {verb} a {thing} and a {adj} {thing} for her {person}.",
    "Don't laugh, but the {thing} my {person} {verb} is {adj}.",
    "The water in the {thing} was {adj}, but the {thing} was {adj}.",
    "Our {person} would rather walk home {place} than drive.",
    "Is your {person}'s {thing} still {adj}, or is it {adj} now?",
    "After the bath, the {person} {verb} the {adj} {thing} {place}.",
    "They heard a {adj} {thing} {place} and started to laugh.",
    "Both of us saw the {person} with a {adj} {thing} {place}.",
    "Can you ask the {person} about the {adj} {thing} {place}?",
    "I thought it was far too {adj} to start the car {place}.",
]


def sentences(n: int, seed: int) -> list[str]:
    """``n`` distinct sentences from templates x word lists, the same for the same seed."""
    rng = np.random.default_rng([seed, 7919])
    out: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 1000 * n:
            raise DemoCorpusError(f"cannot make {n} distinct sentences from the templates")
        template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        text = template
        while "{" in text:
            start = text.index("{")
            slot = text[start + 1:text.index("}", start)]
            words = _WORDS[slot]
            text = text[:start] + words[rng.integers(len(words))] + text[text.index("}", start) + 1:]
        text = re.sub(r"\ba ([aeiou])", r"an \1", text)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


# --- speakers and utterances ------------------------------------------------------------------
@dataclass
class Voice:
    """One speaker: an espeak accent voice plus the parameters of its own variant file."""

    speaker: str
    birthplace: str
    sex: str
    espeak_voice: str
    variant: str  # file name under voices/!v in the private data folder
    pitch_base_hz: float
    pitch_top_hz: float
    formant_scale: list[float]  # formants 0..8, percent/100
    breath: int
    roughness: int
    flutter: int
    rate_wpm: float

    def variant_file(self) -> str:
        """espeak's voice-variant format; formant height and width stay at defaults (-1)."""
        lines = [
            "language variant",
            f"name {self.variant}",
            f"gender {self.sex}",
            f"pitch {round(self.pitch_base_hz)} {round(self.pitch_top_hz)}",
            f"flutter {self.flutter}",
            f"roughness {self.roughness}",
        ]
        lines += [f"formant {k} {round(100 * s)} -1 -1" for k, s in enumerate(self.formant_scale)]
        if self.breath:
            lines.append("breath " + " ".join([str(self.breath)] * 8))
        return "\n".join(lines) + "\n"


@dataclass
class Utterance:
    path: str  # relative to the corpus folder
    text: str
    rate_wpm: int
    pitch_range: int  # espeakRANGE, 0..100 (50 = the voice's own range)
    seed: list[int]  # for the augmentation noise and room
    snr_db: float
    peak_dbfs: float
    rt60_s: float
    drr_db: float


@dataclass
class SpeakerJob:
    voice: Voice
    utterances: list[Utterance]
    data_dir: str = ""
    out_dir: str = ""
    augment: bool = True
    results: list[dict] = field(default_factory=list)


def _spread(rng: np.random.Generator, bounds: tuple[float, float], spread: float) -> float:
    lo, hi = bounds
    centre = (lo + hi) / 2
    return centre + spread * (rng.uniform(lo, hi) - centre)


def draw_voice(rng: np.random.Generator, speaker: str, birthplace: str, sex: str, espeak_voice: str, variant: str,
               spread: float) -> Voice:
    """A speaker's own voice: pitch, formant scaling, breathiness, roughness, flutter and rate, drawn
    from the sex's ranges narrowed around their centres by ``spread``."""
    base = _spread(rng, PITCH_BASE_HZ[sex], spread)
    scale = _spread(rng, FORMANT_SCALE[sex], spread)
    return Voice(
        speaker=speaker,
        birthplace=birthplace,
        sex=sex,
        espeak_voice=espeak_voice,
        variant=variant,
        pitch_base_hz=round(base, 1),
        pitch_top_hz=round(base * _spread(rng, PITCH_TOP_RATIO, spread), 1),
        formant_scale=[round(scale * _spread(rng, (0.98, 1.02), spread), 3) for _ in range(9)],
        breath=round(_spread(rng, BREATH, spread)),
        roughness=round(_spread(rng, ROUGHNESS, spread)),
        flutter=round(_spread(rng, FLUTTER, spread)),
        rate_wpm=round(_spread(rng, RATE_WPM, spread), 1),
    )


def resolve_accents(names: list[str]) -> list[str]:
    """Birthplace labels for accent names given as labels or espeak voices; unknown is an error."""
    by_voice = {v: label for label, v in ACCENTS.items()}
    labels = []
    for name in names or list(ACCENTS):
        key = name.strip().lower()
        label = key if key in ACCENTS else _ALIASES.get(key) or by_voice.get(key)
        if label is None:
            raise ConfigError(
                f"demo_accents: unknown accent {name!r}; use one of {list(ACCENTS)} "
                f"or their espeak voices {list(ACCENTS.values())}"
            )
        if label not in labels:
            labels.append(label)
    return labels


def plan_speakers(cfg: Config) -> list[SpeakerJob]:
    """Every speaker's voice and utterances, drawn from seeds that do not depend on each other.

    A speaker's voice depends only on (seed, accent, slot), so adding an accent or a speaker does
    not change the others. Slot k of every accent reads the same sentences, so text is balanced
    across birthplaces and cannot stand in for the accent.
    """
    if cfg.demo_speakers_per_accent < 1 or cfg.demo_utterances < 1:
        raise ConfigError("demo_speakers_per_accent and demo_utterances must be at least 1")
    if not 0 <= cfg.demo_voice_spread <= 1:
        raise ConfigError(f"demo_voice_spread must be in [0, 1], got {cfg.demo_voice_spread}")
    n_spk, n_utt, spread, seed = (cfg.demo_speakers_per_accent, cfg.demo_utterances,
                                  cfg.demo_voice_spread, cfg.demo_seed)
    n_female = (n_spk + 1) // 2
    pool = sentences(max(n_spk * n_utt, 60), seed)
    jobs = []
    for label in resolve_accents(cfg.demo_accent_list()):
        accent_index = list(ACCENTS).index(label)
        for slot in range(n_spk):
            sex = "female" if slot < n_female else "male"
            number = slot + 1 if sex == "female" else slot - n_female + 1
            speaker = f"{label}-{sex[0]}{number}"
            voice = draw_voice(np.random.default_rng([seed, accent_index, slot]), speaker, label, sex,
                               ACCENTS[label], f"vox{accent_index}{sex[0]}{number}", spread)
            texts = np.random.default_rng([seed, 104729, slot]).choice(len(pool), n_utt, replace=False)
            utterances = []
            for u, t in enumerate(texts):
                useed = [seed, accent_index, slot, u]
                r = np.random.default_rng(useed + [1])
                utterances.append(Utterance(
                    path=f"wav/{speaker}/{speaker}_{u:03d}.wav",
                    text=pool[t],
                    rate_wpm=round(voice.rate_wpm * r.uniform(1 - RATE_JITTER, 1 + RATE_JITTER)),
                    pitch_range=int(r.integers(35, 66)),
                    seed=useed,
                    snr_db=round(r.uniform(*SNR_DB), 2),
                    peak_dbfs=round(r.uniform(*PEAK_DBFS), 2),
                    rt60_s=round(r.uniform(*RT60_S), 3),
                    drr_db=round(r.uniform(*DRR_DB), 2),
                ))
            jobs.append(SpeakerJob(voice, utterances))
    return jobs


# --- espeak-ng through ctypes -----------------------------------------------------------------
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of exit() on a bad data path
_CHARS_UTF8 = 1
_PHONEMES_IPA = 0x02
_RATE, _RANGE = 1, 4
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)


def _espeak_paths() -> tuple[Path, Path]:
    return Path(espeakng_loader.get_library_path()), Path(espeakng_loader.get_data_path())


def check_voices(data: Path, labels: list[str]) -> None:
    """Each accent's voice file must exist in the data's lang tree (names are case-insensitive)."""
    present = {p.name.lower() for p in (data / "lang").rglob("*") if p.is_file()}
    missing = [f"{label} (espeak voice {ACCENTS[label]})" for label in labels
               if ACCENTS[label] not in present]
    if missing:
        raise DemoCorpusError(f"espeak-ng data at {data} has no voice file for: {', '.join(missing)}")


def make_private_data(voices: list[Voice]) -> Path:
    """A temporary espeak data folder: symlinks to the wheel's data plus our variant files."""
    _, data = _espeak_paths()
    # espeak keeps the data path in a short fixed buffer: keep it short (system temp folder)
    root = Path(tempfile.mkdtemp(prefix="vox-espeak-"))
    for entry in data.iterdir():
        if entry.name != "voices":
            (root / entry.name).symlink_to(entry)
    variants = root / "voices" / "!v"
    variants.mkdir(parents=True)
    for entry in (data / "voices" / "!v").iterdir():
        (variants / entry.name).symlink_to(entry)
    for voice in voices:
        (variants / voice.variant).write_text(voice.variant_file())
    return root


class _Espeak:
    """One libespeak-ng instance per process, in synchronous mode, collecting the samples."""

    def __init__(self, data_dir: str):
        library, _ = _espeak_paths()
        self.lib = ctypes.CDLL(str(library))
        self.lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self.lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                                   ctypes.c_int]
        self.chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # keep a reference: C holds the pointer
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_dir.encode(),
                                                      _INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise DemoCorpusError(f"espeak_Initialize failed for data folder {data_dir}")
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        return 0  # 0 = continue synthesis

    def set_voice(self, name: str) -> None:
        if self.lib.espeak_SetVoiceByName(name.encode()) != 0:
            raise DemoCorpusError(f"espeak-ng cannot load voice {name!r}")

    def phonemes(self, text: str) -> str:
        buffer = ctypes.create_string_buffer(text.encode())
        pointer = ctypes.c_void_p(ctypes.addressof(buffer))
        parts = []
        while pointer.value:
            out = self.lib.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_UTF8, _PHONEMES_IPA)
            parts.append((out or b"").decode("utf-8", "replace").strip())
        return " ".join(p for p in parts if p)

    def speak(self, text: str, rate_wpm: int, pitch_range: int) -> np.ndarray:
        """Float waveform at the engine's native rate (22,050 Hz)."""
        self.lib.espeak_SetParameter(_RATE, int(rate_wpm), 0)
        self.lib.espeak_SetParameter(_RANGE, int(pitch_range), 0)
        self.chunks = []
        data = text.encode() + b"\0"
        status = self.lib.espeak_Synth(data, len(data), 0, 0, 0, _CHARS_UTF8, None, None)
        if status != 0:
            raise DemoCorpusError(f"espeak_Synth failed ({status}) for {text!r}")
        if not self.chunks:
            return np.zeros(0, np.float32)
        return np.concatenate(self.chunks).astype(np.float32) / 32768.0


# --- signal processing ------------------------------------------------------------------------
def trim_silence(wave: np.ndarray, sr: int, threshold_db: float = -40.0, pad_s: float = 0.05) -> np.ndarray:
    """Cut leading/trailing frames quieter than threshold_db below the loudest, keeping a pad."""
    frame = int(0.01 * sr)
    n = len(wave) // frame
    if n == 0:
        return wave
    energy = (wave[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
    level = 10 * np.log10(energy + 1e-12)
    active = np.flatnonzero(level > level.max() + threshold_db)
    pad = int(pad_s * sr)
    start = max(active[0] * frame - pad, 0)
    end = min((active[-1] + 1) * frame + pad, len(wave))
    return wave[start:end]


def room_response(rng: np.random.Generator, sr: int, rt60_s: float, drr_db: float) -> np.ndarray:
    """A direct path plus exponentially decaying noise: a small synthetic room."""
    t = np.arange(int(rt60_s * sr)) / sr
    tail = rng.standard_normal(t.size) * 10 ** (-3 * t / rt60_s)  # -60 dB at rt60
    tail[: int(0.002 * sr)] = 0  # the first reflections arrive after the direct sound
    tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail ** 2))
    tail[0] = 1.0
    return tail


def augment(wave: np.ndarray, sr: int, utt: Utterance) -> np.ndarray:
    """Room reverb, additive noise at the utterance's SNR, then its peak level."""
    rng = np.random.default_rng(utt.seed + [2])
    tail_s = 0.1
    room = room_response(rng, sr, utt.rt60_s, utt.drr_db)
    # FFT convolution by hand: importing scipy.signal costs more than rendering a speaker
    n = 1 << (len(wave) + len(room) - 2).bit_length()  # a power of two >= the full length
    wet = np.fft.irfft(np.fft.rfft(wave, n) * np.fft.rfft(room, n), n)[: len(wave) + int(tail_s * sr)]
    power = np.mean(wet ** 2)
    noise = rng.standard_normal(wet.size) * np.sqrt(power * 10 ** (-utt.snr_db / 10))
    out = wet + noise
    return out * (10 ** (utt.peak_dbfs / 20) / np.abs(out).max())


# --- rendering --------------------------------------------------------------------------------
def render_speaker(job: SpeakerJob) -> SpeakerJob:
    """Speak one speaker's utterances in this (fresh) process and write the wav files."""
    engine = _Espeak(job.data_dir)
    voice = job.voice
    # libespeak's noise uses its own generator; seed it so the files do not depend on the process
    speaker_seed = np.random.SeedSequence(job.utterances[0].seed[:3]).generate_state(1)[0]
    engine.lib.espeak_ng_SetRandSeed(ctypes.c_long(int(speaker_seed) % 2 ** 31))
    engine.set_voice(f"{voice.espeak_voice}+{voice.variant}")
    job.results = []
    for utt in job.utterances:
        where = f"{voice.speaker} utterance {utt.path} ({utt.text!r})"
        phonemes = engine.phonemes(utt.text)
        raw = engine.speak(utt.text, utt.rate_wpm, utt.pitch_range)
        if raw.size == 0 or not np.abs(raw).max() > 1e-3:
            raise DemoCorpusError(f"espeak-ng produced silence for {where}")
        wave = soxr.resample(raw, engine.sample_rate, SAMPLE_RATE).astype(np.float64)
        wave = trim_silence(wave, SAMPLE_RATE)
        if job.augment:
            wave = augment(wave, SAMPLE_RATE, utt)
        if not np.all(np.isfinite(wave)):
            raise DemoCorpusError(f"non-finite samples in {where}")
        target = Path(job.out_dir) / utt.path
        target.parent.mkdir(parents=True, exist_ok=True)
        sf.write(target, wave.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
        job.results.append({"phonemes": phonemes, "seconds": round(len(wave) / SAMPLE_RATE, 3)})
    return job


def _render_one(job: SpeakerJob, result: str) -> None:
    """Body of one render process: the parent decides when to stop, a dead parent takes it along."""
    signals.worker_init()
    Path(result).write_bytes(pickle.dumps(render_speaker(job)))


def _render_all(plan: str, results: str) -> None:
    """Entry point of the render helper process: a fresh forked process per speaker.

    The helper is a single-threaded process that only imported this module, and it forks every
    worker from its main thread, so no fork can copy a lock another thread holds (a
    ``multiprocessing.Pool`` with ``maxtasksperchild`` re-forks from its helper thread, and its
    ``terminate()`` can hang for good). Prints one line per finished speaker (the caller's progress
    bar) and pickles the jobs, with their results, to ``results``.
    """
    # The caller stops this helper with SIGTERM (or dies); either way the workers go with it:
    # SIGTERM raises here, and the clean-up below stops them.
    signals.die_with_parent(signal.SIGTERM)
    jobs: list[SpeakerJob] = pickle.loads(Path(plan).read_bytes())
    folder = Path(results).parent
    context = multiprocessing.get_context("fork")
    workers = max(1, min(len(jobs), usable_cores()))
    waiting = list(enumerate(jobs))
    running: dict[int, tuple[multiprocessing.process.BaseProcess, int, Path]] = {}
    done: list[SpeakerJob | None] = [None] * len(jobs)
    with signals.terminate_as_interrupt():
        try:
            while waiting or running:
                while waiting and len(running) < workers:
                    index, job = waiting.pop(0)
                    result = folder / f"speaker{index}.pkl"
                    process = context.Process(target=_render_one, args=(job, str(result)), daemon=True)
                    with signals.held_signals():  # a SIGTERM inside the fork would be lost, see signals.py
                        process.start()
                    running[process.sentinel] = (process, index, result)
                ready = multiprocessing.connection.wait(list(running), timeout=SPEAKER_TIMEOUT_S)
                if not ready:  # a hung worker must not hang the build
                    names = ", ".join(jobs[index].voice.speaker for _, index, _ in running.values())
                    raise DemoCorpusError(f"rendering {names} took over {SPEAKER_TIMEOUT_S} s")
                for sentinel in ready:
                    process, index, result = running.pop(sentinel)
                    process.join()
                    speaker = jobs[index].voice.speaker
                    if process.exitcode != 0 or not result.is_file():
                        raise DemoCorpusError(f"rendering {speaker} failed (exit code {process.exitcode})")
                    done[index] = pickle.loads(result.read_bytes())
                    print(speaker, flush=True)
        except BaseException:
            signals.stop_processes([process for process, _, _ in running.values()])
            raise
    Path(results).write_bytes(pickle.dumps(done))


def run_jobs(jobs: list[SpeakerJob], desc: str = "demo corpus") -> list[SpeakerJob]:
    """Render jobs in fresh processes; return them, with their results, in the input's order.

    The workers run inside a helper process started with ``python -c``: multiprocessing workers
    re-import the parent's main module, which for ``python -m voxlib.train`` or torchrun means
    importing torch once per speaker. The helper forks its workers from a clean process instead.
    """
    with tempfile.TemporaryDirectory(prefix="vox-render-") as tmp:
        plan, results, log = Path(tmp, "jobs.pkl"), Path(tmp, "done.pkl"), Path(tmp, "stderr.txt")
        plan.write_bytes(pickle.dumps(jobs))
        code = "import sys; from voxlib.demo import _render_all; _render_all(sys.argv[1], sys.argv[2])"
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        with log.open("w") as err, subprocess.Popen(
            [sys.executable, "-c", code, str(plan), str(results)],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env,
        ) as helper, tqdm(total=len(jobs), desc=desc, unit="speaker") as bar:
            try:
                for _ in helper.stdout:
                    bar.update(1)
            except BaseException:  # Ctrl-C, SIGTERM: the helper and its workers end before tmp goes
                signals.stop_subprocess(helper)
                raise
        if helper.returncode != 0 or not results.is_file():
            tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
            raise DemoCorpusError(
                f"rendering the demo corpus failed (exit code {helper.returncode}):\n{tail}")
        return pickle.loads(results.read_bytes())


# --- corpus folder ----------------------------------------------------------------------------
def corpus_settings(cfg: Config) -> dict:
    return {
        "version": CORPUS_VERSION,
        "sample_rate": SAMPLE_RATE,
        "accents": resolve_accents(cfg.demo_accent_list()),
        "speakers_per_accent": cfg.demo_speakers_per_accent,
        "utterances": cfg.demo_utterances,
        "voice_spread": cfg.demo_voice_spread,
        "seed": cfg.demo_seed,
    }


def is_complete(out: Path, settings: dict) -> bool:
    """A corpus is complete when its settings marker matches and every listed clip exists."""
    marker, manifest = out / "settings.json", out / "manifest.csv"
    try:
        if json.loads(marker.read_text()) != settings:
            return False
        with manifest.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, ValueError):
        return False
    expected = len(settings["accents"]) * settings["speakers_per_accent"] * settings["utterances"]
    return len(rows) == expected and all((out / row["path"]).is_file() for row in rows)


def build_demo_corpus(out: Path, cfg: Config) -> Path:
    """Write the demo corpus into ``out`` (skipped when already complete); return manifest.csv."""
    out = Path(out)
    settings = corpus_settings(cfg)
    manifest = out / "manifest.csv"
    if is_complete(out, settings):
        return manifest
    jobs = plan_speakers(cfg)
    _, data = _espeak_paths()
    check_voices(data, settings["accents"])
    # a partial or different corpus: drop the marker first, then everything this module writes
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").unlink(missing_ok=True)
    shutil.rmtree(out / "wav", ignore_errors=True)
    private = make_private_data([job.voice for job in jobs])
    try:
        for job in jobs:
            job.data_dir, job.out_dir = str(private), str(out)
        jobs = run_jobs(jobs, desc=f"demo corpus {out.name}")
    finally:
        shutil.rmtree(private, ignore_errors=True)
    _write_tables(out, jobs)
    (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    return manifest


def _write_tables(out: Path, jobs: list[SpeakerJob]) -> None:
    with (out / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "speaker", "birthplace", "sex"])
        for job in jobs:
            v = job.voice
            writer.writerows([u.path, v.speaker, v.birthplace, v.sex] for u in job.utterances)
    with (out / "speakers.csv").open("w", newline="") as fh:
        fields = [k for k in asdict(jobs[0].voice) if k != "formant_scale"] + ["formant_scale"]
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for job in jobs:
            row = asdict(job.voice)
            row["formant_scale"] = " ".join(f"{s:.3f}" for s in row["formant_scale"])
            writer.writerow(row)
    with (out / "utterances.csv").open("w", newline="") as fh:
        fields = ["path", "speaker", "text", "phonemes", "seconds", "rate_wpm", "pitch_range",
                  "snr_db", "peak_dbfs", "rt60_s", "drr_db"]
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for job in jobs:
            for utt, result in zip(job.utterances, job.results):
                writer.writerow({**asdict(utt), **result, "speaker": job.voice.speaker})


def demo_tag(cfg: Config) -> str:
    """A readable folder name for the demo settings, e.g. ``all8_6spk_40utt_spread1_seed0``."""
    labels = resolve_accents(cfg.demo_accent_list())
    accents = "all8" if labels == list(ACCENTS) else "+".join(labels)
    return (f"{accents}_{cfg.demo_speakers_per_accent}spk_{cfg.demo_utterances}utt"
            f"_spread{cfg.demo_voice_spread:g}_seed{cfg.demo_seed}")


def ensure_demo_corpus(cfg: Config) -> Path:
    """The demo corpus for cfg's demo_* settings under outputs/demo/, built on first use."""
    return build_demo_corpus(outputs_dir() / "demo" / demo_tag(cfg), cfg)


DEMO_FIELDS = ("demo_speakers_per_accent", "demo_utterances", "demo_accents", "demo_voice_spread", "demo_seed")


def main(argv: list[str] | None = None) -> Path:
    """Build (or find) the demo corpus; the flags are the Config fields training and the notebooks take."""
    def out_flag(parser) -> None:
        parser.add_argument("--out", type=Path, default=None,
                            help="corpus folder (default: OUTPUTS/demo/<settings>, where training finds it)")

    parser = make_parser("python -m voxlib.demo", "Build the espeak-ng accent demo corpus (wav files + manifest.csv).",
                         config_fields=DEMO_FIELDS, extra=out_flag)
    args, cfg = parse(parser, argv)
    manifest = build_demo_corpus(args.out, cfg) if args.out else ensure_demo_corpus(cfg)
    print(manifest)
    return manifest


if __name__ == "__main__":
    # jobs are pickled for the render helper: they must be voxlib.demo's classes, not __main__'s
    from voxlib import demo

    sys.exit(run_command(demo.main))
