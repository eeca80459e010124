"""Metric definitions printed into every report.md (and kept identical in bench/README.md)."""

GLOSSARY = """\
| Term | Definition |
|---|---|
| TTFT | Time to first token: arrival of the first streamed chunk carrying `choices` minus the moment the request was sent (`vllm bench serve` definition; includes queueing and prefill). |
| TPOT | Time per output token, per request: (E2EL − TTFT) / (output tokens − 1); requests with one output token have none. Mean/percentiles are over requests. (GuideLLM/AIPerf call this ITL.) |
| ITL | Inter-chunk latency as `vllm bench serve` reports it: every gap between successive `choices` chunks, pooled over all requests (one sample per chunk, not per token; AIPerf's ICL). |
| ITL/tok | Token-accurate ITL: each gap between token-bearing chunks divided evenly over the tokens the later chunk carried (token counts from `continuous_usage_stats`), pooled over requests. Equals ITL when every chunk carries one token. |
| Decode TPOT | Time per output token over decode steps only: per request, the token gaps during which no request of the scenario was in prefill (between its send and its first token), divided by the tokens they carried; with all requests sent together, every step after the last prefill ended. Chunked prefill otherwise mixes prefill into TPOT. Decode tok/s per user = 1000 / decode TPOT (p50 over requests). |
| Prefill tok/s | Prompt tokens of completed requests divided by the time at least one prefill was in flight (union of the send → first token windows). TTFT per 1K = TTFT / (prompt tokens / 1000), p50 over requests. |
| E2EL | End-to-end latency: last `choices` chunk minus send time. |
| Req/s, OutTok/s | Completed requests and their output tokens divided by the benchmark duration (first send, or the open-loop schedule's start, to the last request's end). Failed requests are excluded from all latencies and token counts but counted in the duration and in `failed`. |
| p50/p90/p99 | Percentiles with linear interpolation (`numpy.percentile`), computed from raw per-request timestamps (`time.perf_counter_ns`), not from locust's rounded statistics. |
| ISL / OSL / N / C | Prompt tokens (exact, checked with the server's `/tokenize`), output tokens (forced with `ignore_eos` and `min_tokens`), measured requests, and max requests in flight. Warm-up requests are excluded. |
| Closed loop | C users; each sends its next request when its previous one finished (`--request-rate inf --max-concurrency C`). |
| Open loop | Requests arrive at gamma-distributed gaps (shape = burstiness, mean 1/rate; burstiness 1 = Poisson), schedule rescaled to end at N/rate, at most C in flight (`--request-rate R --burstiness B --max-concurrency C`). |
| KV cache tokens | Tokens the server's KV cache holds: `num_gpu_blocks × block_size` from `/metrics` `vllm:cache_config_info` (the startup log's "GPU KV cache size" divides by the number of KV-cache groups and under-reports hybrid models). |
| Max concurrency | Requests of max_model_len tokens that fit at once (startup log "Maximum concurrency"). |
| Predicted | `tqconfig.planner.plan_capacity` for the same stack, dtype and memory settings. |
| Admitted | Admission probe: largest N concurrent requests of the probe length L served with no preemption (`vllm:num_preemptions` unchanged), at each L of `capacity.probe_context_lens` (default 1K, 4K and max_model_len: large KV pages cost short requests most). |
| GSM8K | lm-evaluation-harness `gsm8k` (5-shot, greedy): strict-match = `#### N` answer, flexible-extract = last number; stderr = binomial standard error, CI = 95 % normal interval. |
| NIAH pass@total | Needles retrieved / needles asked over the context length × depth grid (Paul Graham essay haystack). |
| PPL | Perplexity of a fixed corpus from prompt logprobs (exp of the mean negative log-likelihood per token), in windows of token ids that start as a text prompt does (with the BOS where the tokenizer adds one, e.g. Gemma). |
| vs base | Ratio to the baseline KV dtype's value (capacity and throughput: higher is better; latency: lower is better). |
"""
