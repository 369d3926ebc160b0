"""`nr-study bench`: NR's costs measured against plain training, side by side in one process.

Every number is a ratio of two things timed ALTERNATELY in the same process (A, B, A, B, ... with the order
rotated each repetition), after a warm-up, as the median of per-repetition ratios, with the spread printed
(IQR with 4+ repetitions, else min–max). The machine may be shared and noisy: pairs taken back to back see the
same load, so their ratio is far steadier than either time. Speed goals live here, never in timed tests.

Rows (name — what / goal):
  step_nr/plain[M]       NR training step (fwd, bwd, L1 subgradient, SGD step, end_of_step) / plain step   ≤ 1.03
  step_channels_last/contiguous[M]   the plain step in channels_last / contiguous layout (train.channels_last) (info)
  step_bf16/fp32[M]      the plain step under bf16 autocast (train.bf16) / in fp32                        (info)
  util/step[M]           utilization (live masks + params and FLOPs on the hook's cached graph) / one step ≤ 0.01
  surgery_s[M]           rejuvenate(inplace, cached graph) on a copy with ~30% dead channels, seconds       ≤ 0.5
  step_odd/round8        step time per FLOP, a rejuvenation's odd widths / the same rounded to multiples of 8 (info)
  layer_ca_two/plain     NR-CA layer fwd+bwd (two convolutions, the core's default) / plain conv            ≤ 1.3
  layer_ca_four/plain    NR-CA layer fwd+bwd (four convolutions, the official code's form) / plain conv     ≤ 1.3
  layer_cr/plain         NR-CR layer fwd+bwd / plain conv of equal width                                    ≤ 1.3
  layer_ca_two/ca_four   the two CA forms against each other (< 1: "two" is faster)                      (info)
  ca_nest_3/1            NR-CA net fwd+bwd after 3 rejuvenations / after 1 (each nests the last CA layer)  (info)
  sweep_makespan/ideal   makespan of 8 trials of 10-20 s (--quick: 4 of a few s) / (Σ trial time / slots),
                         reuse_actors false (a fresh process per trial); median of 3 sweeps (--quick: 1)    ≤ 1.10
  sweep_makespan/ideal[reuse_actors]   the same with reuse_actors true (the default), alternated with it  ≤ 1.10
  mlflow_share           time inside the tracker's calls / wall time of a real train() run                 ≤ 0.02
  run_nr/bl              a short real NR run (monitor + L1 + surgery) / the BL run of the same epochs        ≤ 1.10
  run_nr_round8/bl       the same NR run with nr.round_to 8 (widths in multiples of 8) / the BL run           (info)
  step_rejuvenated/bl    the trainer's step on the network NR grew (round_to 8 where it ran) / on BL's, per FLOP too (info)
  run_gap_by_part        NR − BL seconds per run, and by part of the loop (train()'s phase_s): setup, data,
                         steps, method_l1, method_events, adopt, eval, measure, checkpoint, tracking, finish (info)
  images_per_s[M]        (--device cuda) plain training-step throughput at batch 128                       (info)

`--quick` is a ≤ 2-minute version of every row (fewer repetitions, smaller shapes, a 4-trial sweep); `--tiny`
(the test suite's) skips the sweep row with null.
`--device cuda` runs the same code on the GPU with channels_last + bf16 autocast (torch.cuda.synchronize()
around every timing) and adds the images/s rows. `--json PATH` writes the rows as a list of
{"name", "value", "goal", "unit", "detail"}.

Modules, one concern each: settings (goals, sizes per mode), timing (alternated timings, medians, spread, the
row record), steps (step rows, widths), surgery, layers (one layer, CA nesting), makespan (the sweep rows), runs
(whole runs, MLflow share, the gap by part), cli (the command, its table and JSON).
"""
from nr_study.bench.cli import SECTIONS, cli_main, format_table, pick_threads, run_bench, status
from nr_study.bench.runs import breakdown_row, instrument_tracker
from nr_study.bench.settings import GOALS, Sizes
from nr_study.bench.surgery import kill_channels
from nr_study.bench.timing import alternate, ratio_stats, row, spread

__all__ = ["cli_main", "run_bench", "format_table", "alternate", "ratio_stats", "GOALS", "SECTIONS", "Sizes",
           "status", "row", "spread", "pick_threads", "kill_channels", "instrument_tracker", "breakdown_row"]
