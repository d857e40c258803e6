// A node-opcua server for the alarm and history tests: a PLC-like server that is not our client
// library. Started by tests/support/node_opcua.py as `node server.js --port N`.
//
// Address space (namespace 1, string node ids):
//   Objects/Filler  (an event notifier of the Server object)
//     Filler.State      Int32, writable, historizing (HistoryRead access)
//     Filler.Reason     Int32, writable, historizing
//     Filler.Speed      Double, writable, not historizing
//     Filler.DoorOpen   Boolean input of the off-normal alarm "DoorOpen" (normal: false)
//     Filler.MotorFault Boolean input of the off-normal alarm "MotorFault" (normal: false)
//   Objects/Press   (an event notifier of the Server object)
//     Press.Jam         Boolean input of the off-normal alarm "Jam" (normal: false)
//
// Control: one JSON object per line on stdin, one JSON answer per line on stdout:
//   {"set": "Filler.DoorOpen", "value": true}                     -> {"ok": true}
//   {"set": "Filler.State", "value": 3, "time": "2026-...Z"}      (source time; kept in history)
// Options: --port N; --seed-seconds N [--seed-values "[1, 3]"]: Filler.State gets a history
// of N values at 1 s steps ending now, cycling through the seed values.
// Lines on stdout that do not start with '{"' are node-opcua's own diagnostics.
// On start it prints {"ready": PORT}.
"use strict";

const readline = require("readline");
const {
    OPCUAServer, Variant, DataType, StatusCodes, nodesets, makeAccessLevelFlag,
} = require("node-opcua");

function arg(name, fallback) {
    const i = process.argv.indexOf(`--${name}`);
    return i >= 0 ? process.argv[i + 1] : fallback;
}

async function main() {
    const port = parseInt(arg("port", "4840"), 10);
    const server = new OPCUAServer({
        port,
        resourcePath: "",
        nodeset_filename: [nodesets.standard],
        buildInfo: { productName: "plant-edge-agent test peer" },
        serverCapacities: { maxSessions: 20 },
        // history of one hour at 1 Hz and more
        maxConnectionsPerEndpoint: 20,
    });
    await server.initialize();
    const addressSpace = server.engine.addressSpace;
    const ns = addressSpace.getOwnNamespace();
    addressSpace.installAlarmsAndConditionsService();
    const objects = addressSpace.rootFolder.objects;
    const serverObject = objects.server;
    const rw = makeAccessLevelFlag("CurrentRead | CurrentWrite");
    const rwh = makeAccessLevelFlag("CurrentRead | CurrentWrite | HistoryRead");
    const vars = {};

    function machine(name) {
        return ns.addObject({
            browseName: name, nodeId: `s=${name}`, organizedBy: objects,
            notifierOf: serverObject, eventNotifier: 1,
        });
    }

    function variable(owner, name, dataType, value, historizing, eventSource) {
        const v = ns.addVariable({
            componentOf: owner, browseName: name, nodeId: `s=${owner.browseName.name}.${name}`,
            eventSourceOf: eventSource ? owner : undefined,
            dataType, accessLevel: historizing ? rwh : rw,
            userAccessLevel: historizing ? rwh : rw,
            value: { dataType: DataType[dataType], value },
        });
        if (historizing) {
            // The historian only accepts increasing times: a seeded history starts before it.
            const seed = parseInt(arg("seed-seconds", "0"), 10);
            const t0 = Date.now() - seed * 1000;
            if (seed > 0) {
                v.setValueFromSource(new Variant({ dataType: DataType[dataType], value }),
                    StatusCodes.Good, new Date(t0 - 1000));
            }
            addressSpace.installHistoricalDataNode(v, { maxOnlineValues: 200000 });
            const cycle = JSON.parse(arg("seed-values", "[1, 3]"));
            for (let k = 0; k < seed; k++) {
                v.setValueFromSource(
                    new Variant({ dataType: DataType[dataType], value: cycle[k % cycle.length] }),
                    StatusCodes.Good, new Date(t0 + k * 1000));
            }
        }
        vars[`${owner.browseName.name}.${name}`] = v;
        return v;
    }

    function offNormal(owner, name) {
        // The input variable is the condition's source and an event source of the machine,
        // so the machine object (a notifier of the Server) sees the alarm's events.
        const input = variable(owner, name, "Boolean", false, false, true);
        const normal = ns.addVariable({
            propertyOf: owner, browseName: `${name}Normal`, nodeId: `s=${owner.browseName.name}.${name}Normal`,
            dataType: "Boolean", value: { dataType: DataType.Boolean, value: false },
        });
        const alarm = ns.instantiateOffNormalAlarm({
            browseName: name, nodeId: `s=${owner.browseName.name}.${name}Alarm`,
            conditionName: name,
            componentOf: owner, conditionSource: input, inputNode: input, normalState: normal,
        });
        alarm.setEnabledState(true);
        return alarm;
    }

    const filler = machine("Filler");
    variable(filler, "State", "Int32", 1, true);
    variable(filler, "Reason", "Int32", 0, true);
    variable(filler, "Speed", "Double", 0, false);
    offNormal(filler, "DoorOpen");
    offNormal(filler, "MotorFault");
    const press = machine("Press");
    offNormal(press, "Jam");

    await server.start();
    process.stdout.write(JSON.stringify({ ready: port }) + "\n");

    const rl = readline.createInterface({ input: process.stdin });
    rl.on("line", (line) => {
        let answer;
        try {
            const cmd = JSON.parse(line);
            if (cmd.set !== undefined) {
                const v = vars[cmd.set];
                if (!v) throw new Error(`no variable ${cmd.set}`);
                const dt = v.dataType.value === DataType.Boolean ? DataType.Boolean
                    : v.dataType.value === DataType.Double ? DataType.Double : DataType.Int32;
                const when = cmd.time ? new Date(cmd.time) : new Date();
                v.setValueFromSource(new Variant({ dataType: dt, value: cmd.value }),
                    StatusCodes.Good, when);
                answer = { ok: true };
            } else {
                throw new Error("unknown command");
            }
        } catch (err) {
            answer = { ok: false, error: String(err && err.message || err) };
        }
        process.stdout.write(JSON.stringify(answer) + "\n");
    });
    rl.on("close", async () => {
        await server.shutdown(0);
        process.exit(0);
    });
    process.on("SIGTERM", async () => {
        await server.shutdown(0);
        process.exit(0);
    });
}

main().catch((err) => {
    process.stderr.write(String(err && err.stack || err) + "\n");
    process.exit(1);
});
