"""Evaluation: multiple-choice/log-likelihood tasks scored as lm-evaluation-harness scores them
(`tasks`, `loglikelihood`, `data`), and HumanEval with a sandbox for generated code."""
