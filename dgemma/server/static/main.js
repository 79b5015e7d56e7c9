// The playground's entry point: connect to the server (with the API key when it needs one), pick the mode (Sudoku
// when the served model is a Sudoku solver, by its id in /v1/models; #chat or #sudoku in the address overrides),
// and start both modes.

import { models, setKey } from "./api.js";
import { setupChat } from "./chat.js";
import { setupSudoku } from "./solver.js";

const $ = (id) => document.getElementById(id);
let model = null;
let modeChosen = false;

function showMode(mode) {
  $("chat-mode").hidden = mode !== "chat";
  $("sudoku-mode").hidden = mode !== "sudoku";
  $(`mode-${mode}`).checked = true;
  document.body.dataset.mode = mode;
}

async function connect() {
  const status = $("server-status");
  setKey($("api-key").value);
  status.textContent = "Connecting…";
  delete status.dataset.connected;
  try {
    const cards = await models();
    model = cards[0].id;
    status.textContent = `Connected: model ${model}, context ${cards[0].max_model_len} tokens.`;
    status.dataset.connected = "true";
    if (!modeChosen) {
      const asked = location.hash.slice(1);
      showMode(asked === "chat" || asked === "sudoku" ? asked : /sudoku/i.test(model) ? "sudoku" : "chat");
      modeChosen = true;
    }
  } catch (err) {
    if (err.status === 401) {
      status.textContent = "This server needs an API key: enter it above and press Connect.";
      $("api-key").focus();
    } else {
      status.textContent = `Cannot reach the server: ${err.message}`;
    }
  }
}

$("connect-form").addEventListener("submit", (e) => {
  e.preventDefault();
  connect();
});
for (const radio of document.querySelectorAll('input[name="mode"]')) {
  radio.addEventListener("change", () => {
    modeChosen = true;
    showMode(radio.value);
  });
}
setupChat(() => model);
setupSudoku(() => model);
connect();
