"""Several activator replicas on Kubernetes (issue 12): the coordination building blocks.

Replicas agree through the Kubernetes API only, the way controllers do:

- `election.LeaderElector`: one leader, elected with a coordination.k8s.io/v1 Lease
  ("activator-leader"), client-go's semantics, fenced by resourceVersion and by a local
  renew deadline that stops the leader before anyone else can take over;
- `replicas.DemandPublisher` / `replicas.ClusterDemand`: every replica publishes its
  per-model demand on a Lease of its own; the leader merges them (sums, oldest wait, last
  activity) and treats a replica it has not heard from as "demand unknown";
- `intent.IntentPublisher` / `intent.IntentWatcher`: the leader publishes the model
  states it decided on its Lease; followers mirror them.

`settings.HaSettings` is the one input they share. `wiring.Replica` puts them to work
in an app (kubernetes.leader_election): the leader's pools decide from every replica's
demand, the followers' pools follow the leader's intent (`follow`, pure rules), and a new
leader reconciles the models from the API before it decides.

Layer 11: may import every layer up to activator.ui.
"""
