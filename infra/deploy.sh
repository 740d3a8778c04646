#!/usr/bin/env bash
# Stand pushline up in a Google Cloud project: APIs, Pub/Sub topics and dead letters, one service
# account per function with least privilege, secrets, the schema, the five functions, their
# subscriptions' retry / dead-letter policy, the scheduled prune (with the cache reconciliation), and the
# monitoring: log-based metrics, one dashboard and the alert policies (infra/monitoring/).
#
#   bash infra/deploy.sh --project P --region R [--dry-run] [--fcm-key-file PATH]
#        [--rules-file PATH] [--redis-secret NAME] [--database-secret NAME] [--max-instances N]
#        [--register-max-instances N] [--sql-max-connections N] [--alert-email ADDRESS]
#
# Each function gets only what it uses: send and on_event never touch PostgreSQL, so they get
# neither DATABASE_URL nor roles/cloudsql.client. deliver is deployed before send and on_event,
# which publish its jobs, so a new job shape never meets an old reader.
#
# --dry-run prints every command ("+ ..." one per line) and runs none of them: it needs no Google
# account, no gcloud and no network. It still builds the package directory (local, harmless).
#
# Secrets never appear on a command line, in the repository or in this script's output:
# DATABASE_URL and REDIS_URL must already be Secret Manager secrets and reach the functions through
# --set-secrets; the FCM key is uploaded from the file the operator names (--data-file=PATH).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROG="deploy.sh"

JOBS_TOPIC="pushline-jobs"
EVENTS_TOPIC="pushline-events"
JOBS_DEAD="pushline-jobs-dead"
EVENTS_DEAD="pushline-events-dead"
FCM_ROLE_ID="pushlineFcmSender"
PRUNE_JOB="pushline-prune"
# Every 15 minutes: each run prunes expired tokens, then reconciles up to RECONCILE_SECONDS (400 s)
# of the token cache with PostgreSQL, so a full sweep at 10 million devices takes hours, not days.
PRUNE_SCHEDULE="*/15 * * * *"
# Deploy timeout of the event functions: under the subscriptions' ack deadline (540 s < 600 s), so
# Pub/Sub never redelivers a job that is still being worked on.
EVENT_TIMEOUT="540s"
ACK_DEADLINE="600"
# How long the event subscriptions keep an unacknowledged message: a part may wait on the bus through
# its whole delivery window (DELIVERY_WINDOW_SECONDS, at most 14 h), so not Eventarc's default 24 h
# but 7 days, and retention never discards a part before its window has closed.
MESSAGE_RETENTION="7d"
# PostgreSQL connections: each instance of a function that uses PostgreSQL keeps up to a pool of
# them (Database(size=8) in shared/db.py). Instances x pool, over register, deliver and prune, must
# stay under Cloud SQL's max_connections, less a reserve for the migration, the operator CLI and
# PostgreSQL's superuser-reserved connections.
DB_POOL_SIZE=8
SQL_RESERVED=10
PRUNE_MAX_INSTANCES=1     # one nightly call
SEND_MAX_INSTANCES=20     # ~600 req/s each with p99 < 50 ms (see Performance): ~12,000 req/s
ON_EVENT_MAX_INSTANCES=10

usage() {
    cat <<'EOF'
usage: bash infra/deploy.sh --project P --region R [options]

required:
  --project P               Google Cloud / Firebase project id
  --region R                region of the functions, connector, triggers and scheduler job

options:
  --dry-run                 print every command without running any (no gcloud, no network)
  --fcm-key-file PATH       service-account JSON key for FCM, uploaded to Secret Manager
                            (without it, deliver sends as its own service account)
  --fcm-secret NAME         secret holding that key (default pushline-fcm-key)
  --rules-file PATH         domain-event rules for on_event: validated, then packaged
  --database-secret NAME    existing secret holding DATABASE_URL (default pushline-database-url)
  --redis-secret NAME       existing secret holding REDIS_URL (default pushline-redis-url)
  --max-instances N         deliver's max instances (default 6: FCM's 10,000 msg/s quota over a
                            measured ~4,000 msg/s per instance = 3, doubled for headroom)
  --register-max-instances N  register's max instances (default 4)
  --sql-max-connections N   the Cloud SQL instance's max_connections (default 100; read yours with
                            SHOW max_connections): (register + deliver + prune instances) x 8 must
                            stay within it less 10, or the script refuses to run
  --cloud-sql-instance P:R:I  attach this Cloud SQL instance (unix socket under /cloudsql)
  --vpc-connector NAME      Serverless VPC Access connector for Memorystore (default pushline-connector)
  --vpc-network NAME        network of a connector this script creates (default default)
  --vpc-range CIDR          /28 range of a connector this script creates (default 10.8.0.0/28)
  --build-service-account EMAIL  service account Cloud Build uses to build the functions
  --build-dir DIR           where the package is built (default .run/build); the monitoring files
                            are rendered beside it (DIR.monitoring)
  --alert-email ADDRESS     e-mail notification channel for the alert policies (found or created);
                            without it the policies notify no one (they still show in the console)
  --skip-migrate            do not apply infra/schema.sql
  -h, --help                this text
EOF
}

die_usage() {
    printf '%s: %s\n' "$PROG" "$1" >&2
    printf 'run "bash infra/deploy.sh --help" for usage\n' >&2
    exit 2
}

die() {
    printf '%s: error: %s\n' "$PROG" "$1" >&2
    exit 1
}

need_value() {  # need_value FLAG "$#"
    if [[ $2 -lt 2 ]]; then
        die_usage "$1 needs a value"
    fi
}

PROJECT=""
REGION=""
DRY_RUN=0
FCM_KEY_FILE=""
FCM_SECRET="pushline-fcm-key"
RULES_FILE=""
DATABASE_SECRET="pushline-database-url"
REDIS_SECRET="pushline-redis-url"
MAX_INSTANCES="6"
REGISTER_MAX_INSTANCES="4"
SQL_MAX_CONNECTIONS="100"
CLOUD_SQL_INSTANCE=""
CONNECTOR="pushline-connector"
VPC_NETWORK="default"
VPC_RANGE="10.8.0.0/28"
BUILD_SA=""
BUILD_DIR="$ROOT/.run/build"
SKIP_MIGRATE=0
ALERT_EMAIL=""

while [[ $# -gt 0 ]]; do
    case "$1" in
        --project) need_value "$1" "$#"; PROJECT="$2"; shift 2 ;;
        --project=*) PROJECT="${1#*=}"; shift ;;
        --region) need_value "$1" "$#"; REGION="$2"; shift 2 ;;
        --region=*) REGION="${1#*=}"; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --fcm-key-file) need_value "$1" "$#"; FCM_KEY_FILE="$2"; shift 2 ;;
        --fcm-key-file=*) FCM_KEY_FILE="${1#*=}"; shift ;;
        --fcm-secret) need_value "$1" "$#"; FCM_SECRET="$2"; shift 2 ;;
        --fcm-secret=*) FCM_SECRET="${1#*=}"; shift ;;
        --rules-file) need_value "$1" "$#"; RULES_FILE="$2"; shift 2 ;;
        --rules-file=*) RULES_FILE="${1#*=}"; shift ;;
        --database-secret) need_value "$1" "$#"; DATABASE_SECRET="$2"; shift 2 ;;
        --database-secret=*) DATABASE_SECRET="${1#*=}"; shift ;;
        --redis-secret) need_value "$1" "$#"; REDIS_SECRET="$2"; shift 2 ;;
        --redis-secret=*) REDIS_SECRET="${1#*=}"; shift ;;
        --max-instances) need_value "$1" "$#"; MAX_INSTANCES="$2"; shift 2 ;;
        --max-instances=*) MAX_INSTANCES="${1#*=}"; shift ;;
        --register-max-instances) need_value "$1" "$#"; REGISTER_MAX_INSTANCES="$2"; shift 2 ;;
        --register-max-instances=*) REGISTER_MAX_INSTANCES="${1#*=}"; shift ;;
        --sql-max-connections) need_value "$1" "$#"; SQL_MAX_CONNECTIONS="$2"; shift 2 ;;
        --sql-max-connections=*) SQL_MAX_CONNECTIONS="${1#*=}"; shift ;;
        --cloud-sql-instance) need_value "$1" "$#"; CLOUD_SQL_INSTANCE="$2"; shift 2 ;;
        --cloud-sql-instance=*) CLOUD_SQL_INSTANCE="${1#*=}"; shift ;;
        --vpc-connector) need_value "$1" "$#"; CONNECTOR="$2"; shift 2 ;;
        --vpc-connector=*) CONNECTOR="${1#*=}"; shift ;;
        --vpc-network) need_value "$1" "$#"; VPC_NETWORK="$2"; shift 2 ;;
        --vpc-network=*) VPC_NETWORK="${1#*=}"; shift ;;
        --vpc-range) need_value "$1" "$#"; VPC_RANGE="$2"; shift 2 ;;
        --vpc-range=*) VPC_RANGE="${1#*=}"; shift ;;
        --build-service-account) need_value "$1" "$#"; BUILD_SA="$2"; shift 2 ;;
        --build-service-account=*) BUILD_SA="${1#*=}"; shift ;;
        --build-dir) need_value "$1" "$#"; BUILD_DIR="$2"; shift 2 ;;
        --build-dir=*) BUILD_DIR="${1#*=}"; shift ;;
        --skip-migrate) SKIP_MIGRATE=1; shift ;;
        --alert-email) need_value "$1" "$#"; ALERT_EMAIL="$2"; shift 2 ;;
        --alert-email=*) ALERT_EMAIL="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die_usage "unknown argument: $1" ;;
    esac
done

[[ -n "$PROJECT" ]] || die_usage "--project is required (the Google Cloud project id to deploy into)"
[[ -n "$REGION" ]] || die_usage "--region is required (e.g. europe-west1)"
[[ "$PROJECT" =~ ^[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]] || die_usage "--project: not a project id: $PROJECT"
[[ "$REGION" =~ ^[a-z]+-[a-z]+[0-9]+$ ]] || die_usage "--region: not a region: $REGION"
[[ "$MAX_INSTANCES" =~ ^[1-9][0-9]*$ ]] || die_usage "--max-instances must be a positive whole number, got: $MAX_INSTANCES"
[[ "$REGISTER_MAX_INSTANCES" =~ ^[1-9][0-9]*$ ]] ||
    die_usage "--register-max-instances must be a positive whole number, got: $REGISTER_MAX_INSTANCES"
[[ "$SQL_MAX_CONNECTIONS" =~ ^[1-9][0-9]*$ ]] ||
    die_usage "--sql-max-connections must be a positive whole number, got: $SQL_MAX_CONNECTIONS"
SQL_CONNECTIONS=$(( (REGISTER_MAX_INSTANCES + MAX_INSTANCES + PRUNE_MAX_INSTANCES) * DB_POOL_SIZE ))
if (( SQL_CONNECTIONS > SQL_MAX_CONNECTIONS - SQL_RESERVED )); then
    die_usage "up to $SQL_CONNECTIONS PostgreSQL connections ((register $REGISTER_MAX_INSTANCES + deliver \
$MAX_INSTANCES + prune $PRUNE_MAX_INSTANCES instances) x pool $DB_POOL_SIZE) exceed --sql-max-connections \
$SQL_MAX_CONNECTIONS less $SQL_RESERVED reserved: lower --max-instances / --register-max-instances, or raise \
--sql-max-connections to the Cloud SQL instance's max_connections"
fi
if [[ -n "$FCM_KEY_FILE" && ! -f "$FCM_KEY_FILE" ]]; then
    die_usage "--fcm-key-file: no such file: $FCM_KEY_FILE"
fi
if [[ -n "$RULES_FILE" && ! -f "$RULES_FILE" ]]; then
    die_usage "--rules-file: no such file: $RULES_FILE"
fi
if [[ -n "$ALERT_EMAIL" && ! "$ALERT_EMAIL" =~ ^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$ ]]; then
    die_usage "--alert-email: not an e-mail address: $ALERT_EMAIL"
fi
if [[ -n "$CLOUD_SQL_INSTANCE" && ! "$CLOUD_SQL_INSTANCE" =~ ^[^:]+:[^:]+:[^:]+$ ]]; then
    die_usage "--cloud-sql-instance must be PROJECT:REGION:INSTANCE, got: $CLOUD_SQL_INSTANCE"
fi

# The Python that validates rules and applies the schema: the repo's venv when there is one.
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then
        PYTHON="$ROOT/.venv/bin/python"
    else
        PYTHON="python3"
    fi
fi

# --- printing and running -------------------------------------------------------------------

quote() {  # a word as it would be typed: bare when safe, single-quoted otherwise (--flag='value')
    local word="$1" flag=""
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
        printf '%s' "$word"
        return
    fi
    if [[ "$word" =~ ^(--[a-z0-9-]+=)(.*)$ ]]; then
        flag="${BASH_REMATCH[1]}"
        word="${BASH_REMATCH[2]}"
    fi
    printf "%s'%s'" "$flag" "${word//\'/\'\\\'\'}"
}

show() {  # print a command, one line, prefixed "+ "
    local line="+" word
    for word in "$@"; do
        line+=" $(quote "$word")"
    done
    printf '%s\n' "$line"
}

run() {  # print the command; run it unless --dry-run
    show "$@"
    if [[ $DRY_RUN -eq 1 ]]; then
        return 0
    fi
    "$@"
}

exists() {  # exists CMD...: the describe check before a create; under --dry-run, shown and "absent"
    show "$@"
    if [[ $DRY_RUN -eq 1 ]]; then
        return 1
    fi
    "$@" >/dev/null 2>&1
}

revoke() {  # revoke CMD...: remove a grant an earlier deploy made, when it is there (shown; run unless --dry-run)
    show "$@"
    if [[ $DRY_RUN -eq 1 ]]; then
        return 0
    fi
    if ! "$@" >/dev/null 2>&1; then
        printf '# (nothing revoked: not granted, or gcloud refused; check with get-iam-policy)\n'
    fi
}

lookup() {  # lookup VAR CMD...: VAR = the command's output, empty when it finds nothing (under --dry-run: shown, empty)
    local var="$1" value=""
    shift
    show "$@"
    if [[ $DRY_RUN -eq 0 ]]; then
        value="$("$@")"
    fi
    printf -v "$var" '%s' "$value"
}

capture() {  # capture VAR PLACEHOLDER CMD...: VAR = the command's output (the placeholder under --dry-run)
    local var="$1" placeholder="$2" value
    shift 2
    show "$@"
    if [[ $DRY_RUN -eq 1 ]]; then
        value="$placeholder"
    else
        value="$("$@")"
        [[ -n "$value" ]] || die "empty answer from: $*"
    fi
    printf -v "$var" '%s' "$value"
}

step() {
    printf '\n# %s\n' "$1"
}

if [[ $DRY_RUN -eq 0 ]]; then
    command -v gcloud >/dev/null 2>&1 || die "gcloud is not installed (https://cloud.google.com/sdk); --dry-run needs none"
    export CLOUDSDK_CORE_DISABLE_PROMPTS=1
fi

P=(--project="$PROJECT")
sa_email() { printf '%s@%s.iam.gserviceaccount.com' "$1" "$PROJECT"; }

# One service account per function (and one per caller identity).
SA_REGISTER="$(sa_email pushline-register)"
SA_SEND="$(sa_email pushline-send)"
SA_DELIVER="$(sa_email pushline-deliver)"
SA_ON_EVENT="$(sa_email pushline-on-event)"
SA_PRUNE="$(sa_email pushline-prune)"
SA_TRIGGER="$(sa_email pushline-trigger)"      # Eventarc -> deliver / on_event
SA_SCHEDULER="$(sa_email pushline-scheduler)"  # Cloud Scheduler -> prune
FUNCTION_SAS=("$SA_REGISTER" "$SA_SEND" "$SA_DELIVER" "$SA_ON_EVENT" "$SA_PRUNE")
POSTGRES_SAS=("$SA_REGISTER" "$SA_DELIVER" "$SA_PRUNE")  # the others use Redis and the bus only
NO_POSTGRES_SAS=("$SA_SEND" "$SA_ON_EVENT")

# --- 0. validate the rules file first ---------------------------------------------------------

if [[ -n "$RULES_FILE" ]]; then
    RULES_FILE="$(cd "$(dirname "$RULES_FILE")" && pwd)/$(basename "$RULES_FILE")"
    step "validate the event rules (local)"
    show "$PYTHON" -m shared.cli check-rules "$RULES_FILE"
    if ! (cd "$ROOT" && "$PYTHON" -m shared.cli check-rules "$RULES_FILE"); then
        die "rules file $RULES_FILE is invalid; nothing was deployed"
    fi
fi

# --- 1. package: the code that runs locally is the code that runs in the cloud --------------------

local_run() {  # packaging is local and harmless: shown and run, --dry-run or not
    show "$@"
    "$@"
}

step "package the functions into $BUILD_DIR (local: built under --dry-run too)"
if [[ -e "$BUILD_DIR" ]]; then
    if [[ ! -f "$BUILD_DIR/.pushline-build" ]] && [[ -n "$(ls -A "$BUILD_DIR")" ]]; then
        die "$BUILD_DIR exists and is not a pushline build directory; refusing to empty it"
    fi
    local_run rm -rf "$BUILD_DIR"
fi
local_run mkdir -p "$BUILD_DIR"
BUILD_DIR="$(cd "$BUILD_DIR" && pwd)"
: >"$BUILD_DIR/.pushline-build"
# functions/main.py imports shared/ from beside itself when deployed, from one level up in the repo.
local_run cp "$ROOT/functions/main.py" "$BUILD_DIR/main.py"
local_run cp -R "$ROOT/shared" "$BUILD_DIR/shared"
local_run cp "$ROOT/requirements.txt" "$BUILD_DIR/requirements.txt"
find "$BUILD_DIR" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +
RULES_ENV=""
if [[ -n "$RULES_FILE" ]]; then
    RULES_NAME="event_rules"
    if [[ "$(basename "$RULES_FILE")" == *.* ]]; then
        RULES_NAME+=".${RULES_FILE##*.}"
    fi
    local_run cp "$RULES_FILE" "$BUILD_DIR/$RULES_NAME"
    # Cloud Run functions run from /workspace, where the source is unpacked.
    RULES_ENV=",EVENT_RULES=/workspace/$RULES_NAME"
fi
printf '%s\n' ".pushline-build" "__pycache__/" "*.pyc" >"$BUILD_DIR/.gcloudignore"

# --- 2. APIs ------------------------------------------------------------------------------------

step "enable the APIs"
run gcloud services enable "${P[@]}" \
    cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com \
    artifactregistry.googleapis.com eventarc.googleapis.com pubsub.googleapis.com \
    secretmanager.googleapis.com sqladmin.googleapis.com redis.googleapis.com \
    vpcaccess.googleapis.com cloudscheduler.googleapis.com fcm.googleapis.com \
    firebase.googleapis.com iam.googleapis.com compute.googleapis.com \
    logging.googleapis.com monitoring.googleapis.com

capture PROJECT_NUMBER PROJECT_NUMBER gcloud projects describe "$PROJECT" --format='value(projectNumber)'
PUBSUB_AGENT="service-${PROJECT_NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"

step "the store URLs must already be secrets (they carry credentials)"
for secret in "$DATABASE_SECRET" "$REDIS_SECRET"; do
    if ! exists gcloud secrets describe "$secret" "${P[@]}"; then
        if [[ $DRY_RUN -eq 0 ]]; then
            die "secret $secret does not exist; create it first, reading the value from stdin:
    gcloud secrets create $secret --project=$PROJECT --replication-policy=automatic --data-file=-"
        fi
        printf '# (a real run stops here if %s is missing: create it beforehand)\n' "$secret"
    fi
done

# --- 3. network: Memorystore is reached through a Serverless VPC Access connector -----------------

step "VPC connector $CONNECTOR"
if ! exists gcloud compute networks vpc-access connectors describe "$CONNECTOR" --region="$REGION" "${P[@]}"; then
    run gcloud compute networks vpc-access connectors create "$CONNECTOR" --region="$REGION" "${P[@]}" \
        --network="$VPC_NETWORK" --range="$VPC_RANGE" --min-instances=2 --max-instances=10
fi
CONNECTOR_PATH="projects/$PROJECT/locations/$REGION/connectors/$CONNECTOR"

# --- 4. Pub/Sub: job and event topics, their dead letters -----------------------------------------

step "Pub/Sub topics and dead letters"
for topic in "$JOBS_TOPIC" "$EVENTS_TOPIC" "$JOBS_DEAD" "$EVENTS_DEAD"; do
    if ! exists gcloud pubsub topics describe "$topic" "${P[@]}"; then
        run gcloud pubsub topics create "$topic" "${P[@]}"
    fi
done
for dead in "$JOBS_DEAD" "$EVENTS_DEAD"; do
    if ! exists gcloud pubsub subscriptions describe "$dead-sub" "${P[@]}"; then
        run gcloud pubsub subscriptions create "$dead-sub" "${P[@]}" --topic="$dead" \
            --ack-deadline=60 --message-retention-duration=7d --expiration-period=never
    fi
    # The Pub/Sub service agent forwards undeliverable messages here.
    run gcloud pubsub topics add-iam-policy-binding "$dead" "${P[@]}" \
        --member="serviceAccount:$PUBSUB_AGENT" --role=roles/pubsub.publisher
done

# --- 5. identities: one service account per function, least privilege ------------------------------

step "service accounts"
for email in "${FUNCTION_SAS[@]}" "$SA_TRIGGER" "$SA_SCHEDULER"; do
    id="${email%%@*}"
    if ! exists gcloud iam service-accounts describe "$email" "${P[@]}"; then
        run gcloud iam service-accounts create "$id" "${P[@]}" --display-name="$id"
    fi
done

step "custom role $FCM_ROLE_ID: send FCM messages, nothing else"
if ! exists gcloud iam roles describe "$FCM_ROLE_ID" "${P[@]}"; then
    run gcloud iam roles create "$FCM_ROLE_ID" "${P[@]}" --title="pushline FCM sender" \
        --description="Send messages through FCM HTTP v1" \
        --permissions=cloudmessaging.messages.create --stage=GA
fi
run gcloud projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$SA_DELIVER" \
    --role="projects/$PROJECT/roles/$FCM_ROLE_ID" --condition=None

step "Cloud SQL client for the functions that use PostgreSQL: register, deliver, prune"
for email in "${POSTGRES_SAS[@]}"; do
    run gcloud projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$email" \
        --role=roles/cloudsql.client --condition=None
done

step "publishers of $JOBS_TOPIC: send, deliver (fan-out parts), on_event"
for email in "$SA_SEND" "$SA_DELIVER" "$SA_ON_EVENT"; do
    run gcloud pubsub topics add-iam-policy-binding "$JOBS_TOPIC" "${P[@]}" \
        --member="serviceAccount:$email" --role=roles/pubsub.publisher
done

# Pub/Sub mints the OIDC tokens of the push subscriptions as the trigger's identity.
run gcloud iam service-accounts add-iam-policy-binding "$SA_TRIGGER" "${P[@]}" \
    --member="serviceAccount:$PUBSUB_AGENT" --role=roles/iam.serviceAccountTokenCreator

# --- 6. secrets: values never on a command line ---------------------------------------------------

step "secrets: REDIS_URL for every function, DATABASE_URL for register, deliver and prune only"
for email in "${FUNCTION_SAS[@]}"; do
    run gcloud secrets add-iam-policy-binding "$REDIS_SECRET" "${P[@]}" \
        --member="serviceAccount:$email" --role=roles/secretmanager.secretAccessor
done
for email in "${POSTGRES_SAS[@]}"; do
    run gcloud secrets add-iam-policy-binding "$DATABASE_SECRET" "${P[@]}" \
        --member="serviceAccount:$email" --role=roles/secretmanager.secretAccessor
done

step "take back what earlier deploys granted send and on_event (PostgreSQL)"
for email in "${NO_POSTGRES_SAS[@]}"; do
    revoke gcloud projects remove-iam-policy-binding "$PROJECT" --member="serviceAccount:$email" \
        --role=roles/cloudsql.client --condition=None
    revoke gcloud secrets remove-iam-policy-binding "$DATABASE_SECRET" "${P[@]}" \
        --member="serviceAccount:$email" --role=roles/secretmanager.secretAccessor
done

FCM_ENV=""
if [[ -n "$FCM_KEY_FILE" ]]; then
    if exists gcloud secrets describe "$FCM_SECRET" "${P[@]}"; then
        run gcloud secrets versions add "$FCM_SECRET" "${P[@]}" --data-file="$FCM_KEY_FILE"
    else
        run gcloud secrets create "$FCM_SECRET" "${P[@]}" --replication-policy=automatic \
            --data-file="$FCM_KEY_FILE"
    fi
    run gcloud secrets add-iam-policy-binding "$FCM_SECRET" "${P[@]}" \
        --member="serviceAccount:$SA_DELIVER" --role=roles/secretmanager.secretAccessor
    # The secret's resource path, not its value: deliver reads the key itself, once per instance.
    FCM_ENV=",FCM_CREDENTIALS_SECRET=projects/$PROJECT/secrets/$FCM_SECRET/versions/latest"
fi

# --- 7. the schema -----------------------------------------------------------------------------

if [[ $SKIP_MIGRATE -eq 0 ]]; then
    step "apply infra/schema.sql (DATABASE_URL read from Secret Manager into this one process)"
    # Printed with the $(...) unexpanded; the URL itself is never printed.
    # shellcheck disable=SC2016  # the $(...) is meant to be printed, not expanded
    printf '+ DATABASE_URL="$(gcloud secrets versions access latest --secret=%s --project=%s)" %s -m shared.cli migrate\n' \
        "$DATABASE_SECRET" "$PROJECT" "$(quote "$PYTHON")"
    if [[ $DRY_RUN -eq 0 ]]; then
        database_url="$(gcloud secrets versions access latest --secret="$DATABASE_SECRET" "${P[@]}")"
        (cd "$ROOT" && DATABASE_URL="$database_url" "$PYTHON" -m shared.cli migrate)
        unset database_url
    fi
fi

# --- 8. the functions ----------------------------------------------------------------------------

ENV_COMMON="GOOGLE_CLOUD_PROJECT=$PROJECT,PUBSUB_TOPIC=$JOBS_TOPIC,LOG_LEVEL=INFO"
SECRETS_REDIS="REDIS_URL=$REDIS_SECRET:latest"
SECRETS_POSTGRES="DATABASE_URL=$DATABASE_SECRET:latest,$SECRETS_REDIS"
COMMON=(--gen2 --runtime=python311 --region="$REGION" "${P[@]}" --source="$BUILD_DIR"
    --vpc-connector="$CONNECTOR_PATH" --egress-settings=private-ranges-only)
if [[ -n "$BUILD_SA" ]]; then
    COMMON+=(--build-service-account="projects/$PROJECT/serviceAccounts/$BUILD_SA")
fi

attach_cloud_sql() {  # attach Cloud SQL's unix socket (/cloudsql/...) to a PostgreSQL function's Cloud Run service
    if [[ -n "$CLOUD_SQL_INSTANCE" ]]; then
        run gcloud run services update "$1" --region="$REGION" "${P[@]}" \
            --add-cloudsql-instances="$CLOUD_SQL_INSTANCE"
    fi
}

printf '\n# PostgreSQL connections at most: (register %s + deliver %s + prune %s instances) x pool %s = %s of %s (%s kept for the migration, the CLI and PostgreSQL)\n' \
    "$REGISTER_MAX_INSTANCES" "$MAX_INSTANCES" "$PRUNE_MAX_INSTANCES" "$DB_POOL_SIZE" "$SQL_CONNECTIONS" \
    "$SQL_MAX_CONNECTIONS" "$SQL_RESERVED"

# deliver first: send and on_event publish its jobs, so it reads every shape they may write.
step "deploy deliver (Pub/Sub $JOBS_TOPIC, internal traffic only; max instances $MAX_INSTANCES)"
run gcloud functions deploy deliver "${COMMON[@]}" --entry-point=deliver \
    --trigger-topic="$JOBS_TOPIC" --retry --trigger-service-account="$SA_TRIGGER" \
    --ingress-settings=internal-only \
    --service-account="$SA_DELIVER" --cpu=1 --memory=1Gi --timeout="$EVENT_TIMEOUT" \
    --concurrency=1 --max-instances="$MAX_INSTANCES" \
    --set-secrets="$SECRETS_POSTGRES" --set-env-vars="$ENV_COMMON$FCM_ENV"
attach_cloud_sql deliver

step "deploy register (HTTP, public: checks Firebase ID tokens itself; max instances $REGISTER_MAX_INSTANCES)"
run gcloud functions deploy register "${COMMON[@]}" --entry-point=register \
    --trigger-http --allow-unauthenticated --ingress-settings=all \
    --service-account="$SA_REGISTER" --cpu=1 --memory=512Mi --concurrency=80 \
    --max-instances="$REGISTER_MAX_INSTANCES" \
    --set-secrets="$SECRETS_POSTGRES" --set-env-vars="THREADS=8,$ENV_COMMON"
attach_cloud_sql register

step "deploy send (HTTP, private: IAM invoker only; no PostgreSQL)"
run gcloud functions deploy send "${COMMON[@]}" --entry-point=send \
    --trigger-http --no-allow-unauthenticated --ingress-settings=all \
    --service-account="$SA_SEND" --cpu=1 --memory=512Mi --concurrency=80 \
    --max-instances="$SEND_MAX_INSTANCES" \
    --set-secrets="$SECRETS_REDIS" --set-env-vars="THREADS=8,$ENV_COMMON"

step "deploy on_event (Pub/Sub $EVENTS_TOPIC, internal traffic only; no PostgreSQL)"
if [[ -z "$RULES_FILE" ]]; then
    printf '# note: no --rules-file given: on_event runs without EVENT_RULES\n'
fi
run gcloud functions deploy on-event "${COMMON[@]}" --entry-point=on_event \
    --trigger-topic="$EVENTS_TOPIC" --retry --trigger-service-account="$SA_TRIGGER" \
    --ingress-settings=internal-only \
    --service-account="$SA_ON_EVENT" --cpu=1 --memory=512Mi --timeout="$EVENT_TIMEOUT" \
    --concurrency=1 --max-instances="$ON_EVENT_MAX_INSTANCES" \
    --set-secrets="$SECRETS_REDIS" --set-env-vars="$ENV_COMMON$RULES_ENV"

step "deploy prune (HTTP, private, internal traffic only: called by Cloud Scheduler)"
run gcloud functions deploy prune "${COMMON[@]}" --entry-point=prune \
    --trigger-http --no-allow-unauthenticated --ingress-settings=internal-only \
    --service-account="$SA_PRUNE" --cpu=1 --memory=512Mi --timeout="$EVENT_TIMEOUT" \
    --concurrency=1 --max-instances="$PRUNE_MAX_INSTANCES" \
    --set-secrets="$SECRETS_POSTGRES" --set-env-vars="$ENV_COMMON"
attach_cloud_sql prune

# --- 9. the event functions' subscriptions: ack deadline, backoff, dead letters, retention -------

configure_subscription() {  # configure_subscription FUNCTION DEAD_TOPIC VAR (VAR = its subscription's id)
    local function="$1" dead="$2" trigger subscription upper
    upper="$(printf '%s' "$function" | tr 'a-z-' 'A-Z_')"
    step "subscription of $function -> dead letters on $dead"
    run gcloud functions add-invoker-policy-binding "$function" --region="$REGION" "${P[@]}" \
        --member="serviceAccount:$SA_TRIGGER"
    capture trigger "projects/$PROJECT/locations/$REGION/triggers/${upper}_TRIGGER" \
        gcloud functions describe "$function" --gen2 --region="$REGION" "${P[@]}" \
        --format='value(eventTrigger.trigger)'
    capture subscription "projects/$PROJECT/subscriptions/${upper}_SUBSCRIPTION" \
        gcloud eventarc triggers describe "$trigger" --location="$REGION" "${P[@]}" \
        --format='value(transport.pubsub.subscription)'
    run gcloud pubsub subscriptions update "$subscription" "${P[@]}" \
        --ack-deadline="$ACK_DEADLINE" --dead-letter-topic="projects/$PROJECT/topics/$dead" \
        --max-delivery-attempts=100 --min-retry-delay=10s --max-retry-delay=600s \
        --message-retention-duration="$MESSAGE_RETENTION"
    # The service agent acknowledges what it forwards to the dead-letter topic.
    run gcloud pubsub subscriptions add-iam-policy-binding "$subscription" "${P[@]}" \
        --member="serviceAccount:$PUBSUB_AGENT" --role=roles/pubsub.subscriber
    printf -v "$3" '%s' "${subscription##*/}"
}
configure_subscription deliver "$JOBS_DEAD" JOBS_SUBSCRIPTION
configure_subscription on-event "$EVENTS_DEAD" EVENTS_SUBSCRIPTION

# --- 10. prune (and reconcile the token cache) every 15 minutes ---------------------------------

step "schedule prune"
run gcloud functions add-invoker-policy-binding prune --region="$REGION" "${P[@]}" \
    --member="serviceAccount:$SA_SCHEDULER"
capture PRUNE_URL "https://prune-PLACEHOLDER.$REGION.run.app" \
    gcloud functions describe prune --gen2 --region="$REGION" "${P[@]}" --format='value(serviceConfig.uri)'
SCHEDULE_ARGS=(--location="$REGION" "${P[@]}" --schedule="$PRUNE_SCHEDULE" --time-zone=Etc/UTC
    --uri="$PRUNE_URL" --http-method=POST --attempt-deadline="$EVENT_TIMEOUT"
    --oidc-service-account-email="$SA_SCHEDULER" --oidc-token-audience="$PRUNE_URL")
if exists gcloud scheduler jobs describe "$PRUNE_JOB" --location="$REGION" "${P[@]}"; then
    run gcloud scheduler jobs update http "$PRUNE_JOB" "${SCHEDULE_ARGS[@]}"
else
    run gcloud scheduler jobs create http "$PRUNE_JOB" "${SCHEDULE_ARGS[@]}"
fi

# --- 11. monitoring: log-based metrics, the dashboard, the alert policies (infra/monitoring/) -------

MONITORING="$ROOT/infra/monitoring"
MONITORING_DIR="$BUILD_DIR.monitoring"  # the files rendered for this project (local: under --dry-run too)

render() {  # render SRC DEST [ETAG]: the placeholders (@PROJECT@, the subscriptions, the channel) filled in
    local channel=""
    if [[ -n "$ALERT_CHANNEL" ]]; then
        channel="\"$ALERT_CHANNEL\""
    fi
    sed -e "s|@PROJECT@|$PROJECT|g" -e "s|@JOBS_SUBSCRIPTION@|$JOBS_SUBSCRIPTION|g" \
        -e "s|@EVENTS_SUBSCRIPTION@|$EVENTS_SUBSCRIPTION|g" -e "s|\"@ALERT_CHANNEL@\"|$channel|g" "$1" | {
        IFS= read -r first  # the object's opening brace
        printf '%s\n' "$first"
        if [[ -n "${3:-}" ]]; then  # an update names the version it replaces
            printf '  "etag": "%s",\n' "$3"
        fi
        cat
    } >"$2"
}

step "log-based metrics from the functions' JSON log lines (created, or updated to infra/monitoring/metrics)"
for file in "$MONITORING"/metrics/*.json; do
    metric="$(basename "$file" .json)"
    if exists gcloud logging metrics describe "$metric" "${P[@]}"; then
        run gcloud logging metrics update "$metric" "${P[@]}" --config-from-file="$file"
    else
        run gcloud logging metrics create "$metric" "${P[@]}" --config-from-file="$file"
    fi
done

if [[ -e "$MONITORING_DIR" && ! -f "$MONITORING_DIR/.pushline-monitoring" && -n "$(ls -A "$MONITORING_DIR")" ]]; then
    die "$MONITORING_DIR exists and is not a pushline monitoring directory; refusing to write into it"
fi
mkdir -p "$MONITORING_DIR/alerts"
: >"$MONITORING_DIR/.pushline-monitoring"

ALERT_CHANNEL=""
if [[ -n "$ALERT_EMAIL" ]]; then
    step "notification channel: e-mail to $ALERT_EMAIL (found, or created)"
    lookup ALERT_CHANNEL gcloud beta monitoring channels list "${P[@]}" \
        --filter="type=\"email\" AND labels.email_address=\"$ALERT_EMAIL\"" --format='value(name)' --limit=1
    if [[ -z "$ALERT_CHANNEL" ]]; then
        capture ALERT_CHANNEL "projects/$PROJECT/notificationChannels/ALERT_CHANNEL" \
            gcloud beta monitoring channels create "${P[@]}" --type=email \
            --display-name="pushline alerts ($ALERT_EMAIL)" --channel-labels="email_address=$ALERT_EMAIL" \
            --format='value(name)'
    fi
fi

step "dashboard pushline (infra/monitoring/dashboard.json)"
if exists gcloud monitoring dashboards describe "projects/$PROJECT/dashboards/pushline" "${P[@]}"; then
    lookup etag gcloud monitoring dashboards describe "projects/$PROJECT/dashboards/pushline" "${P[@]}" \
        --format='value(etag)'
    render "$MONITORING/dashboard.json" "$MONITORING_DIR/dashboard.json" "$etag"
    run gcloud monitoring dashboards update "projects/$PROJECT/dashboards/pushline" "${P[@]}" \
        --config-from-file="$MONITORING_DIR/dashboard.json"
else
    render "$MONITORING/dashboard.json" "$MONITORING_DIR/dashboard.json"
    run gcloud monitoring dashboards create "${P[@]}" --config-from-file="$MONITORING_DIR/dashboard.json"
fi

step "alert policies (infra/monitoring/alerts), found by display name: updated, or created"
for file in "$MONITORING"/alerts/*.json; do
    rendered="$MONITORING_DIR/alerts/$(basename "$file")"
    render "$file" "$rendered"
    title="$(sed -n 's/^  "displayName": "\(.*\)",$/\1/p' "$file")"
    lookup policy gcloud monitoring policies list "${P[@]}" --filter="displayName=\"$title\"" \
        --format='value(name)' --limit=1
    if [[ -n "$policy" ]]; then
        run gcloud monitoring policies update "$policy" "${P[@]}" --policy-from-file="$rendered"
    else
        run gcloud monitoring policies create "${P[@]}" --policy-from-file="$rendered"
    fi
done

step "done"
printf '# send is private: grant each backend that calls it the invoker role, e.g.\n'
printf '#   gcloud functions add-invoker-policy-binding send --region=%s --project=%s --member=serviceAccount:BACKEND_SA\n' \
    "$REGION" "$PROJECT"
if [[ $DRY_RUN -eq 1 ]]; then
    printf '# dry run: nothing was changed in %s (package built in %s, monitoring files in %s)\n' \
        "$PROJECT" "$BUILD_DIR" "$MONITORING_DIR"
fi
