"""`python -m balancer`: place experts for given loads (or a DeepSeek-V3-sized demo) and report.

  python -m balancer --demo
  python -m balancer --loads loads.npy --replicas 16 --groups 4 --nodes 2 --gpus 8
"""

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("loads", None, "[num_layers, num_experts] loads, as .npy or .json (nested lists).")
flags.DEFINE_bool("demo", False, "Use synthetic skewed loads of DeepSeek-V3's size (58 layers x 256 experts).")
flags.DEFINE_integer("replicas", 288, "Physical expert slots per layer.")
flags.DEFINE_integer("groups", 8, "Expert groups.")
flags.DEFINE_integer("nodes", 4, "Server nodes.")
flags.DEFINE_integer("gpus", 32, "GPUs in all.")
flags.DEFINE_bool("refine", True, "Also run the local-search refinement and report it.")
flags.DEFINE_integer("show_layers", 1, "Print the per-GPU placement of this many layers.")
flags.DEFINE_string("output", None, "Save the reported placement (refined unless --norefine): phy2log, log2phy, logcnt, as .npz.")
flags.DEFINE_integer("seed", 0, "Seed of the --demo loads.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.demo == (FLAGS.loads is not None):
    raise app.UsageError("give exactly one of --demo or --loads FILE")

  import jax

  from balancer import cli

  logging.info("process %d of %d", jax.process_index(), jax.process_count())
  try:
    cluster = cli.Cluster(FLAGS.replicas, FLAGS.groups, FLAGS.nodes, FLAGS.gpus)
    if FLAGS.demo:
      weight = cli.demo_loads(FLAGS.seed)
      print(f"demo: synthetic Zipf(1.0) loads, 65536 routed tokens per layer, seed {FLAGS.seed}")
    else:
      weight = cli.read_loads(FLAGS.loads)
    print(cli.placement_report(weight, cluster, refine=FLAGS.refine, show_layers=FLAGS.show_layers,
                               output=FLAGS.output))
  except ValueError as err:
    raise app.UsageError(str(err)) from None


if __name__ == "__main__":
  app.run(main)
