"""OpenAI-compatible HTTP server for FastVLM (`fastvlm serve`): protocol (wire schemas),
serving (requests → model → responses), media (safe image / video loading; fetch: SSRF guard
and deadline-bounded downloads; mediapool: their worker threads), app (routes), loadtest
(client-side benchmark). Needs the `server` extra: pip install 'fastvlm[server]'."""
