"""An Ollama-compatible HTTP server for tests that really runs the uploaded GGUF with llama.cpp.

Run it as its own process from the repository root:

    python -m tests.ollama_server --port 0 --data DIR [--version 0.32.15] [--host 127.0.0.1]
                                  [--seed -1] [--prune-grace 3600]

It prints one line, ``listening on http://HOST:PORT``, once it accepts connections. Model templates are Go
text/template, so it needs Go: tests/gotemplate is built on first use (`apt-get install golang-go`).

Modules: names (model names), ggufinfo (GGUF headers), store (blobs, manifests, pruning), create (the create
worker), pull (the pull worker and blob downloads), registry_client (Ollama's registry HTTP client), faults (test
faults), generation (llama.cpp), templates (template selection, capabilities, chat-template autodetection;
named_templates.json, gothink/), jinja (the GGUF's chat template as llama-server applies it), chat (generate and
chat), api (the other endpoints), handler (HTTP, `main`), launch (OllamaTestServer, ServerPool).

It follows Ollama 0.32 and, for templates and pulls, current Ollama (server/create.go, server/routes.go,
server/images.go, server/download.go, manifest/, template/ of ollama/ollama):
- The store is Ollama's: blobs/sha256-<hex> and manifests/<host>/<namespace>/<model>/<tag>, the manifest JSON
  as Go writes it. /api/tags `digest` is the sha256 of that file, `modified_at` its mtime.
- A GGUF import is validated by llama.cpp's quantizer in COPY mode and stored as a new layer with a new digest:
  `parsing GGUF`, `validating GGUF model` (progress), `verifying conversion`, then silence while the result is
  copied and hashed, then one `creating new layer …`/`using existing layer …` per layer, `writing manifest`,
  `success`. The uploaded blob is left unreferenced. `quantize` (Q4_K_S, Q4_K_M, Q8_0 from F16/BF16/F32)
  replaces the COPY with `quantizing F16 model to Q8_0` lines.
- The create runs in a worker that hands every line to the request handler and waits until the handler took
  it (Go's unbuffered channel). A streaming client that goes away leaves the worker stuck before its next line:
  the manifest is never written. With "stream": false the handler drains the worker and the create completes.
- An error before the first line is a plain HTTP error; a later one an NDJSON {"error"} line under HTTP 200
  (a bad TEMPLATE, parsed after the rewrite, is "template error: …"; a GGUF llama.cpp refuses is "failed to
  validate GGUF with llama-quantize …").
- At start, blobs that no manifest references (and partial downloads) are pruned once older than an hour
  (OLLAMA_NOPRUNE: never); a create or a pull removes the layers only the replaced manifest used.
- /api/pull follows current Ollama (server/images.go PullModel, server/download.go, routes.go PullHandler):
  `{"model": "HOST:PORT/NAMESPACE/MODEL:TAG", "insecure": true}` fetches the Docker v2 manifest over https, or
  http when insecure (so insecure false against a plain-HTTP registry fails as Go does: "http: server gave HTTP
  response to HTTPS client"); each layer then the config that blobs/ lacks: a HEAD for its size, a GET that must
  answer 200 or 307 with a Location ("http: no Location header in response" otherwise, ollama#7244; its body is
  never read), then ranged GETs of that URL into blobs/<blob>-partial (parts of 100 MB to 1 GB recorded in
  <blob>-partial-N), resumed by the next pull after a failure or a cancel; then every downloaded blob is re-hashed
  (a mismatch deletes it: "digest mismatch, file must be downloaded again: want …, got …") and the manifest is
  written as the registry's bytes, so the /api/tags digest is the registry's manifest digest. Lines: `pulling
  manifest`, `pulling <12 hex>` (with digest, total, completed: once for a stored blob, else every 60 ms while its
  download runs), `verifying sha256 digest`, `writing manifest`, `removing unused layers`, `success`; errors after
  the first line come in-stream. A client that goes away cancels the pull (its partials stay). The pull sends no
  credentials: from a registry with basic auth it fails on the token flow ("realm host "" does not match …").
- A GGUF import gets the named template (and its stops) nearest its `tokenizer.chat_template` within Levenshtein
  distance 100, as "using autodetected template NAME"; a TEMPLATE sent replaces it, sent parameters win.
- Templates and capabilities follow current Ollama (server/images.go GetModel/Capabilities, routes.go): a model
  with a Go TEMPLATE is rendered by it unless the GGUF's chat template advertises more (shouldPreferChatTemplate;
  OLLAMA_GO_TEMPLATE set turns that off, =0 disables Go templates); a model without one, or preferring its chat
  template, is rendered by that Jinja template as llama-server does (ChatML when the GGUF has none), and
  /api/show `template` is then the Jinja text. /api/show and /api/tags list `capabilities`, each as Ollama
  computes it. `_debug_render_only` answers `_debug_info` {rendered_template, image_count} without generating.
- Prompts are rendered by Go's text/template with Ollama's rules; /api/show `parameters` are Go's %#v lines in
  random order; sampling defaults are api.DefaultOptions (seed -1, temperature 0.8, top_k 40, top_p 0.9,
  repeat_penalty 1.0, num_predict -1); num_ctx as sent, else OLLAMA_CONTEXT_LENGTH or 4096 (the CPU tier);
  keep_alive 5m (OLLAMA_KEEP_ALIVE), 0 unloads after the request, negative keeps the model loaded.

Test-only, not Ollama:
- POST/GET /_test/faults (faults.py: FAULT_DEFAULTS, CreateRules; fail_pull_after_bytes breaks a pull's first
  download off after N bytes with Ollama's "max retries exceeded: unexpected EOF", minus its 63 s of retries),
  GET /_test/stats (pulls, pulls_failed and bytes_pulled, the blob bytes read from registries, among them),
  GET/DELETE /_test/requests (handler.py), --seed (a default for requests without one), --prune-grace
  (seconds; 0 prunes young blobs at start), and `OllamaTestServer` / `ServerPool` (launch.py) to start servers
  from tests.
- One GGUF per create (no safetensors, adapters, drafts, split GGUFs); requests are checked for tools/thinking/
  insert capabilities and tools reach the templates, but no tool calls or thinking are parsed from the output,
  images are counted, not seen; built-in renderers and parsers (RENDERER/PARSER) are not emulated (the Go
  TEMPLATE renders); a prompt longer than num_ctx is an error instead of being truncated, generation stops at
  the end of the context instead of shifting it; two threads per model; a pull of a model with tensor layers
  fails as on a host without MLX, `:cloud`/`:local` name suffixes are not normalized, and the token request a
  401 leads to is not signed with an Ollama key.
"""

from .common import REPO
from .launch import OllamaTestServer, ServerPool

__all__ = ["REPO", "OllamaTestServer", "ServerPool"]
