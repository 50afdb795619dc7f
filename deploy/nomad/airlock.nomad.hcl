# Airlock's controller as a Nomad system job: one per client node, all on one PostgreSQL
# (as E2B runs its orchestrator). Airlock places VMs itself; Nomad only keeps one
# controller running on every node.
#
# The database URL and the cluster key come from Nomad Variables:
#   nomad var put nomad/jobs/airlock database_url='postgresql+asyncpg://...' \
#     cluster_key=@/var/lib/airlock/secret.key
# Every node must have the same cluster key: see README, "Deploying".

job "airlock" {
  type        = "system"
  datacenters = ["*"]

  # One node at a time: drain it first (its running VMs finish), then replace it.
  update {
    max_parallel     = 1
    min_healthy_time = "30s"
    healthy_deadline = "5m"
  }

  group "controller" {
    network {
      port "http" {
        static = 4000
      }
    }

    service {
      name     = "airlock"
      port     = "http"
      provider = "nomad"

      check {
        type     = "http"
        path     = "/readyz"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "airlock" {
      # On the host itself, as root: the runtimes need /dev/kvm, user namespaces and the
      # host's cgroups, which a container driver gives only fully privileged.
      driver = "raw_exec"

      config {
        command = "/opt/airlock/.venv/bin/airlock"
        args    = ["serve"]
      }

      env {
        AIRLOCK_NODE_NAME       = "${node.unique.name}"
        AIRLOCK_HOST            = "0.0.0.0"
        AIRLOCK_PORT            = "${NOMAD_PORT_http}"
        AIRLOCK_PUBLIC_URL      = "http://${attr.unique.network.ip-address}:${NOMAD_PORT_http}"
        AIRLOCK_DATA_DIR        = "/var/lib/airlock"
        AIRLOCK_SECRET_KEY_FILE = "${NOMAD_SECRETS_DIR}/cluster.key"
        AIRLOCK_RUNTIME         = "sandbox"
        AIRLOCK_LOG_JSON        = "true"
      }

      template {
        destination = "secrets/database.env"
        env         = true
        perms       = "0600"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/airlock" }}AIRLOCK_DATABASE_URL={{ .database_url }}{{ end }}
        EOT
      }

      template {
        destination = "secrets/cluster.key"
        perms       = "0600"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/airlock" }}{{ .cluster_key }}{{ end }}
        EOT
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      resources {
        cpu    = 1000
        memory = 512
      }
    }
  }
}
