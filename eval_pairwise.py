"""Unified-Bench (Protocol 2): which of two captions of the same image would let it be redrawn better?

Protocol 1 (eval_unified.py) measures a caption through the model's own decoder. Protocol 2 asks judges
instead (the paper: four LLMs), pair by pair: for each source image, the candidate's caption (model A)
against a baseline's (model B), under one criterion (PROMPT): which caption lets a painter reproduce the
image most faithfully (objects, attributes, positions, counts), wrong statements penalised. The win
rate of A over B is reported per judge and as the judges' mean (DESIGN §7).

    python eval_pairwise.py --candidate=out/eval_rl/captions.jsonl --baseline=out/eval_base/captions.jsonl  # shapes bench, exact judge
    python eval_pairwise.py --candidate=A/captions.jsonl --baseline=B/captions.jsonl --data=my/bench.jsonl \
        --judges='hf:/ckpt/Qwen2.5-7B-Instruct; openai:https://api.openai.com/v1|gpt-4o|OPENAI_API_KEY'

Inputs: two captions.jsonl files as eval_unified writes them ({"image": <file name>, "caption": ...} per
line) and the source records (a JSONL, or a folder of images); a pair is matched by the image's file
name, and both files must caption exactly the sources. Judges (`judges`, see parse_judges): `exact` (the
shapes oracle, Protocol 2's ground truth here), `hf:<dir>` (a local causal LM) and
`openai:<base_url>|<model>|<ENV_VAR>` (an OpenAI-compatible endpoint, its replies cached on disk).

Each pair is judged in both orders to cancel position bias; an unreadable verdict is asked once more, then
counted as unparseable and left out of the rates, never dropped unreported (ChatJudge, tally). Win rate =
(wins + ties / 2) / decided pairs with its 95% Wilson interval, beside the decisive win rate; with
`protocol1`, each judge's agreement with Protocol 1's per-image ordering. Headline (fourth run, test):
the exact judge prefers encoder RL's captions to base's, win rate 0.994 (0.990 .. 0.997), agreeing with
Protocol 1 on 0.973 of pairs.

Writes out_dir/results.json (counts, rates, per-image verdicts and replies, the prompt, the config) and
out_dir/results.md (the table); prints the table.
"""
import hashlib
import http.client
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request

import shapes
from common import device_rule, out_dir_rule
from configurator import above, at_least, check, ConfigError, configure, must, one_of
from data import DataError, jsonl_lines, read_records, write_json

config = dict(
    candidate="out/eval/captions.jsonl",  # model A's captions.jsonl (eval_unified's format)
    baseline="out/eval_base/captions.jsonl",  # model B's, the baseline
    data="data/shapes/bench.jsonl",  # the source records (shapes world: with "scene", which the exact judge needs)
    judges="exact",  # judge specs separated by , or ;: exact | hf:<dir> | openai:<base_url>|<model>|<ENV_VAR>
    out_dir="out/pairwise",  # where results.json, results.md and the HTTP cache go
    protocol1=True,  # compare with Protocol 1 when a results.json of eval_unified sits beside both captions files
    max_new_tokens=32,  # reply cap of an hf: judge (a verdict is a word; a thinking model needs more)
    batch_size=8,  # conversations per generate call of an hf: judge
    device="auto",  # hf: judges: auto = cuda if available else cpu
    dtype="float32",  # hf: judges' weights (bfloat16 halves the memory of a large one)
    api_params='{"temperature": 0}',  # JSON merged into each chat-completions request body (o-series models: '{}')
    http_timeout=60.0,  # seconds per request
    http_retries=4,  # retries of a request on timeouts, connection errors, 429 and 5xx (backoff doubles)
    http_backoff=2.0,  # seconds before the first retry
    cache="",  # JSONL of received replies (empty = out_dir/http_cache.jsonl)
)
rules = dict(  # valid values beyond the types (configurator), checked by evaluate before any work; the judge specs: parse_judges
    candidate=must(lambda v, c: os.path.isfile(v), "a captions.jsonl file"),
    baseline=must(lambda v, c: os.path.isfile(v), "a captions.jsonl file"),
    data=must(lambda v, c: os.path.exists(v), "a JSONL file or a folder of images"),
    out_dir=out_dir_rule,
    max_new_tokens=at_least(1),
    batch_size=at_least(1),
    device=device_rule,
    dtype=one_of("float32", "bfloat16", "float16"),
    api_params=must(lambda v, c: isinstance(json.loads(v), dict), "a JSON object, e.g. '{\"temperature\": 0}'"),
    http_timeout=above(0.0),
    http_retries=at_least(0),
    http_backoff=at_least(0.0),
    cache=must(lambda v, c: not v or (not os.path.isdir(v) and os.path.isdir(os.path.dirname(os.path.abspath(v)))),
               "empty (out_dir/http_cache.jsonl) or a file in an existing directory"),
)

PROMPT = """You compare two descriptions of the same image. A painter who cannot see the image will paint it
from one description only. Which description lets the painter reproduce the image most faithfully: every
object, its attributes (colour, shape, size), its position, and how many objects there are? A description
that states something wrong (an object that is not there, a wrong attribute, a wrong position or count)
misleads the painter: penalise wrong statements, and do not reward length for its own sake.

Description A: {first}
Description B: {second}

Reply with exactly one word: A, B or TIE."""
REMINDER = "Your reply could not be read as a verdict. Reply with exactly one word: A, B or TIE."
VERDICTS = ("A", "B", "TIE")
ORDERS = ("ab", "ba")  # ab: the candidate's caption is A; ba: it is B
Z95 = 1.959963984540054  # the standard normal's 0.975 quantile


class JudgeError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- inputs

def read_captions(path: str) -> dict[str, str]:
    """{image file name: caption} of a captions.jsonl; bad lines and repeated images name file:line."""
    captions, first = {}, {}
    for where, row in jsonl_lines(path, "captions"):
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("caption"), str):
            raise DataError(f'{where}: each line needs an "image" string and a "caption" string')
        if first.setdefault(row["image"], where) != where:
            raise DataError(f"{where}: image {row['image']} again (first at {first[row['image']]})")
        captions[row["image"]] = row["caption"]
    if not captions:
        raise DataError(f"{path}: no captions")
    return captions


def load_pairs(cfg) -> tuple[list[str], list[str], list[str], list[dict]]:
    """(names, candidate captions, baseline captions, records), in the sources' order, each pair matched
    by the image's file name (eval_unified writes the basename); both files must caption exactly the sources."""
    records = read_records(cfg.data, need_caption=False)
    names, first = [os.path.basename(r["image"]) for r in records], {}
    for r, name in zip(records, names):
        if first.setdefault(name, r["where"]) != r["where"]:
            raise DataError(f"{r['where']}: image file name {name} again (first at {first[name]}): pairs are matched by it")
    texts = []
    for path in (cfg.candidate, cfg.baseline):
        captions = read_captions(path)
        missing = [n for n in names if n not in captions]
        extra = sorted(captions.keys() - set(names))
        if missing or extra:
            raise DataError(f"{path}: does not caption the sources of {cfg.data}: {len(missing)} missing "
                            f"{missing[:3]}, {len(extra)} not among them {extra[:3]}")
        texts.append([captions[n] for n in names])
    return names, texts[0], texts[1], records


def protocol1_scores(cfg, names: list[str]) -> list[tuple[float, float]] | None:
    """Per image (candidate, baseline) Unified-Score of Protocol 1, from the results.json of eval_unified
    beside each captions file, matched by image name; None when either is absent or protocol1 is off."""
    files = [os.path.join(os.path.dirname(os.path.abspath(p)), "results.json") for p in (cfg.candidate, cfg.baseline)]
    if not cfg.protocol1 or not all(os.path.isfile(f) for f in files):
        print("protocol1: " + ("off" if not cfg.protocol1 else f"no results.json beside both captions files ({files}), skipped"))
        return None
    per_image = []
    for f in files:
        with open(f) as fh:
            scores = json.load(fh).get("unified_score_per_image")
        if not isinstance(scores, dict):
            raise DataError(f"{f}: no unified_score_per_image (not a results.json of eval_unified)")
        missing = [n for n in names if not isinstance(scores.get(n), (int, float))]
        if missing:
            raise DataError(f"{f}: unified_score_per_image has no score for {len(missing)} images, e.g. {missing[0]}")
        per_image.append([scores[n] for n in names])
    return list(zip(*per_image))


# ----------------------------------------------------------------------------- verdicts

def parse_verdict(reply: str | None) -> str | None:
    """'A', 'B' or 'TIE' from a judge's reply, else None. Read: the whole reply as one word (case,
    quotes, markdown and punctuation ignored; a <think>...</think> block dropped), else the last line of
    the form 'verdict: X' or 'answer: X'."""
    if reply is None:
        return None
    text = re.sub(r"<think>.*?</think>", "", reply, flags=re.S | re.I).strip()
    word = re.sub(r"^[\W_]+|[\W_]+$", "", text).upper()
    if word in VERDICTS:
        return word
    found = re.findall(r"\b(?:verdict|answer)\s*(?:is)?\s*[:=\-]?\s*[\W_]*\b(A|B|TIE)\b", text, flags=re.I)
    return found[-1].upper() if found else None


def exact_score(caption: str, scene: tuple) -> dict:
    """The exact judge's reading of a caption (shapes.caption_counts): correct = objects named that are in
    the scene + sizes and positions stated right; wrong = objects named that are not + those stated wrong."""
    c = shapes.caption_counts(caption, scene)
    correct = c["found"] + c["attributes_correct"]
    wrong = (c["mentions"] - c["found"]) + (c["attributes_stated"] - c["attributes_correct"])
    return {"correct": correct, "wrong": wrong, "score": correct - wrong}


class ExactJudge:
    """The shapes world's ground truth: the caption with the higher exact_score wins, equal scores tie."""

    def __init__(self, spec: str, records: list[dict]):
        missing = next((r["where"] for r in records if "scene" not in r), None)
        if missing is not None:
            raise DataError(f"judge 'exact' needs the shapes world's scenes: {missing} has no \"scene\"")
        shapes.scenes_of(records)  # every scene's fields checked now, not midway
        self.spec, self.calls = spec, 0

    def decide(self, orders: list[tuple[str, str, dict]]) -> list[dict]:
        out = []
        for first, second, record in orders:
            scene = shapes.scene_from_json(record["scene"])
            a, b = exact_score(first, scene)["score"], exact_score(second, scene)["score"]
            verdict = "A" if a > b else "B" if b > a else "TIE"
            out.append({"verdict": verdict, "reply": f"{verdict} (score {a} vs {b})", "retried": False})
        self.calls += len(orders)
        return out


class ChatJudge:
    """A judge that reads PROMPT as a chat and replies in words; `complete` is its model's. An unreadable
    reply is asked once more with the reply and REMINDER added; still unreadable, its verdict is None."""

    def decide(self, orders: list[tuple[str, str, dict]]) -> list[dict]:
        chats = [[{"role": "user", "content": PROMPT.format(first=a, second=b)}] for a, b, _ in orders]
        out = [{"verdict": parse_verdict(r), "reply": r, "retried": False} for r in self.complete(chats)]
        again = [i for i, o in enumerate(out) if o["verdict"] is None]
        retry = [chats[i] + [{"role": "assistant", "content": out[i]["reply"] or ""}, {"role": "user", "content": REMINDER}]
                 for i in again]
        for i, reply in zip(again, self.complete(retry) if retry else []):
            out[i] = {"verdict": parse_verdict(reply), "reply": reply, "first_reply": out[i]["reply"], "retried": True}
        return out


class HFJudge(ChatJudge):
    """A local transformers causal LM, greedy, through its tokenizer's chat template (text only)."""

    def __init__(self, spec: str, directory: str, cfg):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if not os.path.isdir(directory):
            raise ConfigError(f"judge spec {spec!r}: no such directory '{directory}'")
        self.spec, self.calls, self.cfg = spec, 0, cfg
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        if not self.tokenizer.chat_template:
            raise ConfigError(f"judge spec {spec!r}: the tokenizer of {directory} has no chat template")
        self.tokenizer.padding_side = "left"  # generation continues every row from its own end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True,
                                                          dtype=getattr(torch, cfg.dtype)).to(device).eval()

    def complete(self, chats: list[list[dict]]) -> list[str]:
        import torch
        replies = []
        for i in range(0, len(chats), self.cfg.batch_size):
            texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                     for c in chats[i:i + self.cfg.batch_size]]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
            with torch.no_grad():
                out = self.model.generate(**batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
            new = out[:, batch["input_ids"].shape[1]:]
            replies += self.tokenizer.batch_decode(new, skip_special_tokens=True)
            self.calls += len(texts)
        return replies


class ReplyCache:
    """Received replies, one JSON line each ({"key", "reply"}), appended and flushed to disk as they come.
    A line torn by a kill mid-write (the last, without its newline) is cut off on opening."""

    def __init__(self, path: str):
        self.path, self.replies = path, {}
        if not os.path.isfile(path):
            return
        with open(path, "rb") as f:
            raw = f.read()
        if raw and not raw.endswith(b"\n"):
            print(f"{path}: its last line was cut by a stopped run; dropped")
            raw = raw[:raw.rfind(b"\n") + 1]
            with open(path, "wb") as f:
                f.write(raw)
        for lineno, line in enumerate(raw.decode().splitlines(), start=1):
            try:
                row = json.loads(line)
                self.replies[row["key"]] = row["reply"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{lineno}: not a cache line {{\"key\", \"reply\"}}") from None

    def put(self, key: str, reply: str | None):
        self.replies[key] = reply
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "reply": reply}) + "\n")
            f.flush()
            os.fsync(f.fileno())


class OpenAIJudge(ChatJudge):
    """An OpenAI-compatible /v1/chat/completions endpoint over urllib, every reply cached (ReplyCache).
    calls counts the requests actually sent (retries included), cached the replies reused."""

    def __init__(self, spec: str, fields: list[str], cfg, cache: ReplyCache):
        base_url, model, env = (fields + [""])[:3]
        if not base_url.startswith(("http://", "https://")) or not model:
            raise ConfigError(f"judge spec {spec!r}: expected openai:<base_url>|<model>|<ENV_VAR> with an http(s) URL")
        self.headers = {"Content-Type": "application/json"}
        if env:
            if not os.environ.get(env):
                raise ConfigError(f"judge spec {spec!r}: the environment variable {env} is not set (it holds the API key)")
            self.headers["Authorization"] = f"Bearer {os.environ[env]}"
        self.spec, self.model, self.params, self.cfg, self.cache = spec, model, json.loads(cfg.api_params), cfg, cache
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.calls = self.cached = 0

    def complete(self, chats: list[list[dict]]) -> list[str | None]:
        replies = []
        for chat in chats:
            body = {**self.params, "model": self.model, "messages": chat}
            key = hashlib.sha256(json.dumps([self.spec, body], sort_keys=True).encode()).hexdigest()
            if key in self.cache.replies:
                self.cached += 1
            else:
                self.cache.put(key, self.post(body))
            replies.append(self.cache.replies[key])
        return replies

    def post(self, body: dict) -> str | None:
        """The reply's text; None when the server answered with something that is no chat completion."""
        data = json.dumps(body).encode()
        for attempt in range(self.cfg.http_retries + 1):
            self.calls += 1
            try:
                request = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.cfg.http_timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    raise JudgeError(f"judge {self.spec}: HTTP {e.code} from {self.url}: {e.read()[:300]!r}") from None
                problem = f"HTTP {e.code}"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # timeouts are OSErrors too
                problem = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt == self.cfg.http_retries:
                raise JudgeError(f"judge {self.spec}: {self.url} failed {attempt + 1} times, last: {problem}. The replies "
                                 f"received are in {self.cache.path}: rerun the same command to resume")
            delay = self.cfg.http_backoff * 2 ** attempt
            print(f"judge {self.spec}: {problem}; retry {attempt + 1}/{self.cfg.http_retries} in {delay:.2f} s")
            time.sleep(delay)
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            print(f"judge {self.spec}: a reply that is no chat completion: {raw[:200]!r}")
            return None
        return content


def parse_judges(text: str, cfg, records: list[dict]) -> list:
    """The judges of the config key `judges`: specs separated by , or ; (a URL holding either cannot be
    given). Each bad spec is named in the error.
    - `exact` (shapes world: the records carry "scene"): the oracle reads each caption into mentions
      (shapes.caption_counts); score = correct - wrong, where correct = objects named that are in the scene
      + sizes and positions stated right, wrong = objects named that are not + sizes and positions stated
      wrong. The higher score wins, equal scores tie.
    - `hf:<dir>`: a local transformers causal LM (its tokenizer's chat template, greedy); text only: it sees
      the two captions, not the image.
    - `openai:<base_url>|<model>|<ENV_VAR>`: an OpenAI-compatible endpoint, POST <base_url>/chat/completions
      (base_url ends in /v1, as OpenAI clients take it), the API key read from the environment variable
      ENV_VAR (two fields, no key sent: a local server). urllib with a timeout; timeouts, connection
      errors, 429 and 5xx are retried with exponential backoff, then the run stops; other HTTP errors stop
      it at once. Every reply received is appended to a JSONL cache keyed by a hash of the spec and the
      request body, so a rerun of a stopped or killed run pays for nothing twice."""
    specs = [s.strip() for s in re.split(r"[;,]", text) if s.strip()]
    if not specs:
        raise ConfigError("config key 'judges' is empty: give exact, hf:<dir> or openai:<base_url>|<model>|<ENV_VAR>")
    if len(set(specs)) < len(specs):
        raise ConfigError(f"config key 'judges': a spec is given twice in {text!r}")
    judges, cache = [], None
    for spec in specs:
        kind, _, rest = spec.partition(":")
        if spec == "exact":
            judges.append(ExactJudge(spec, records))
        elif kind == "hf" and rest:
            judges.append(HFJudge(spec, rest, cfg))
        elif kind == "openai" and rest:
            if cache is None:
                os.makedirs(cfg.out_dir, exist_ok=True)
                cache = ReplyCache(cfg.cache or os.path.join(cfg.out_dir, "http_cache.jsonl"))
            judges.append(OpenAIJudge(spec, rest.split("|"), cfg, cache))
        else:
            raise ConfigError(f"config key 'judges': bad spec {spec!r}: expected exact, hf:<dir> or "
                              f"openai:<base_url>|<model>|<ENV_VAR>")
    return judges


# ----------------------------------------------------------------------------- tallies

def wilson(successes: float, n: int, z: float = Z95) -> list[float]:
    """The Wilson score interval of a proportion successes / n ([None, None] when n = 0: JSON has no NaN)."""
    if n == 0:
        return [None, None]
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)]


OUTCOME = {("ab", "A"): 1, ("ab", "B"): -1, ("ba", "A"): -1, ("ba", "B"): 1}  # the candidate's, TIE = 0


def tally(names: list[str], verdicts: dict[str, list[dict]], p1: list[tuple[float, float]] | None) -> tuple[dict, dict]:
    """One judge's figures and per-image record from its verdicts in both orders ({order: [per pair]}).
    Per pair the two orders' outcomes for the candidate (+1 win, 0 tie, -1 loss) are summed: > 0 win, < 0
    loss, 0 tie (a judge that always names the first caption ties every pair); a pair with an unparseable
    order is counted as unparseable. Order agreement: of the pairs read in both orders, the fraction whose
    outcomes are equal. Win rate = (wins + ties / 2) / decided, its Wilson interval over the decided pairs
    (conservative: ties vary less than a coin flip); decisive win rate = wins / (wins + losses). Protocol-1
    agreement: of the decisive pairs whose two reconstructions scored differently
    (unified_score_per_image), the fraction whose winner is the higher-scored caption."""
    counts = dict.fromkeys(("win", "tie", "loss", "unparseable"), 0)
    agree = both = p1_agree = p1_n = 0
    per_image = {}
    for i, name in enumerate(names):
        v = {o: verdicts[o][i] for o in ORDERS}
        outcome = {o: None if v[o]["verdict"] is None else OUTCOME.get((o, v[o]["verdict"]), 0) for o in ORDERS}
        if None in outcome.values():
            result = "unparseable"
        else:
            both += 1
            agree += outcome["ab"] == outcome["ba"]
            total = outcome["ab"] + outcome["ba"]
            result = "win" if total > 0 else "loss" if total < 0 else "tie"
            if p1 is not None and result != "tie" and p1[i][0] != p1[i][1]:
                p1_n += 1
                p1_agree += (result == "win") == (p1[i][0] > p1[i][1])
        counts[result] += 1
        per_image[name] = {"result": result, **{o: v[o]["verdict"] for o in ORDERS},
                           "replies": [v[o]["reply"] for o in ORDERS]}
    decided, decisive = counts["win"] + counts["tie"] + counts["loss"], counts["win"] + counts["loss"]
    rate = lambda k, n: k / n if n else None  # no pair to count: no rate
    figures = {
        **counts, "pairs": len(names),
        "unparseable_verdicts": {o: sum(v["verdict"] is None for v in verdicts[o]) for o in ORDERS},
        "retried_verdicts": sum(v["retried"] for o in ORDERS for v in verdicts[o]),
        "win_rate": rate(counts["win"] + counts["tie"] / 2, decided),
        "win_rate_ci95": wilson(counts["win"] + counts["tie"] / 2, decided),
        "decisive_win_rate": rate(counts["win"], decisive), "decisive_win_rate_ci95": wilson(counts["win"], decisive),
        "order_agreement": rate(agree, both)}
    if p1 is not None:
        figures["protocol1_agreement"] = {"pairs": p1_n, "agree": p1_agree, "rate": rate(p1_agree, p1_n),
                                          "ci95": wilson(p1_agree, p1_n)}
    return figures, per_image


def table(results: dict) -> str:
    """The judges' figures as a markdown table, the judges' mean last."""
    f = lambda x: "—" if x is None else f"{x:.3f}"
    interval = lambda ci: f"{f(ci[0])} .. {f(ci[1])}"
    rows = ["| judge | win | tie | loss | unparseable (A/B, B/A) | win rate (ties ½) | 95% Wilson | decisive win rate "
            "| 95% Wilson | order agreement | Protocol 1 agreement |", "|---" * 11 + "|"]
    for spec, j in results["judges"].items():
        p1 = j.get("protocol1_agreement")
        rows.append(f"| `{spec}` | {j['win']} | {j['tie']} | {j['loss']} | {j['unparseable']} "
                    f"({j['unparseable_verdicts']['ab']}, {j['unparseable_verdicts']['ba']}) | {f(j['win_rate'])} | "
                    f"{interval(j['win_rate_ci95'])} | {f(j['decisive_win_rate'])} | {interval(j['decisive_win_rate_ci95'])} | "
                    f"{f(j['order_agreement'])} | " + (f"{f(p1['rate'])} of {p1['pairs']}" if p1 else "—") + " |")
    rows.append(f"| judges' mean | | | | | {f(results['mean_win_rate'])} | | | | | |")
    return "\n".join(rows)


def unknown_words(names: list[str], texts: list[str], side: str) -> dict:
    """The captions with words outside the shapes world's vocabulary, which the exact judge cannot read
    (shapes.unknown_words): counted and printed, never silently ignored."""
    found = {n: words for n, t in zip(names, texts) if (words := shapes.unknown_words(t))}
    if found:
        name, words = next(iter(found.items()))
        print(f"warning: {len(found)} of {len(texts)} {side} captions have words outside the shapes world's vocabulary "
              f"(e.g. {name}: {', '.join(map(repr, words[:5]))}): the exact judge reads only the world's words")
    return {"captions": len(found), "per_image": found}


def evaluate(cfg) -> dict:
    check(cfg, rules)
    names, candidate, baseline, records = load_pairs(cfg)
    p1 = protocol1_scores(cfg, names)
    judges = parse_judges(cfg.judges, cfg, records)
    os.makedirs(cfg.out_dir, exist_ok=True)
    results = {"candidate": cfg.candidate, "baseline": cfg.baseline, "data": cfg.data, "pairs": len(names),
               "prompt": PROMPT, "judges": {}, "per_image": {}}
    for judge in judges:
        t0 = time.time()
        orders = {"ab": list(zip(candidate, baseline, records)), "ba": list(zip(baseline, candidate, records))}
        verdicts = {o: judge.decide(pairs) for o, pairs in orders.items()}
        results["judges"][judge.spec], results["per_image"][judge.spec] = tally(names, verdicts, p1)
        results["judges"][judge.spec]["calls"] = judge.calls
        print(f"judge {judge.spec}: {len(names)} pairs in both orders, {judge.calls} calls"
              + (f" ({judge.cached} replies from the cache)" if hasattr(judge, "cached") else "")
              + f", {time.time() - t0:.1f} s")
    rates = [j["win_rate"] for j in results["judges"].values() if j["win_rate"] is not None]
    results["mean_win_rate"] = sum(rates) / len(rates) if rates else None  # of the judges with a rate
    if any(isinstance(j, ExactJudge) for j in judges):
        results["unknown_words"] = {side: unknown_words(names, texts, side)
                                    for side, texts in (("candidate", candidate), ("baseline", baseline))}
        results["exact_scores"] = {n: {"candidate": exact_score(c, shapes.scene_from_json(r["scene"])),
                                       "baseline": exact_score(b, shapes.scene_from_json(r["scene"]))}
                                   for n, c, b, r in zip(names, candidate, baseline, records)}
    if p1 is not None:
        results["protocol1"] = {"candidate_higher": sum(a > b for a, b in p1), "baseline_higher": sum(b > a for a, b in p1),
                                "equal": sum(a == b for a, b in p1)}
    results["config"] = vars(cfg)
    write_json(os.path.join(cfg.out_dir, "results.json"), results)
    with open(os.path.join(cfg.out_dir, "results.md"), "w") as f:
        f.write(table(results) + "\n")
    return results


def main(argv=None):
    cfg = configure(config, argv)
    results = evaluate(cfg)
    print(table(results))
    print(f"wrote {os.path.join(cfg.out_dir, 'results.json')} and results.md")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
