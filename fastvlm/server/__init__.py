"""OpenAI-compatible HTTP server for FastVLM (`fastvlm serve`): protocol (wire schemas),
serving (requests → model → responses), media (safe image fetching), app (routes), loadtest
(client-side benchmark). Needs the `server` extra: pip install 'fastvlm[server]'."""
