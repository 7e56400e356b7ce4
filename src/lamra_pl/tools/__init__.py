"""The tools around runs: `lamra-pl grid` (a named sequence of fits and tool steps, resumable) and `lamra-pl report`
(runs compared in a table and plots)."""
